//! Which rendezvous key a peer insists on. Signaling is TLS 1.3 with the rendezvous' own
//! ed25519 key; a peer pins it as it pins other peers: a key given in the configuration
//! (`HOST:PORT#KEY`, `--rendezvous-key`, `rendezvous_key` in config.toml) is insisted on,
//! else the one written in the home's `known_rendezvous` at first contact (trust on first
//! use, as ssh does). A server that proves another key gets nothing: not the token, not a
//! registration; the peer says so loudly and keeps retrying.

use tracing::warn;
use wire::signal::PublicKey;
use wire::signal::client::{Client, ClientConfig, ClientError};

use crate::home::Home;

/// How the rendezvous' key is checked.
#[derive(Debug, Clone, Default)]
pub struct Trust {
    /// Configured: insisted on, nothing written down.
    pub key: Option<PublicKey>,
    /// Whose `known_rendezvous` pins the key on first contact when none is configured.
    /// Without either, any key is accepted (tests, one-off tools).
    pub home: Option<Home>,
}

impl Trust {
    /// The key to insist on when connecting to `rendezvous`, if there is one yet.
    pub fn expected(&self, rendezvous: &str) -> Result<Option<PublicKey>, ClientError> {
        if self.key.is_some() {
            return Ok(self.key);
        }
        match &self.home {
            Some(h) => h
                .rendezvous_pin(rendezvous)
                .map_err(|e| ClientError::Pin(e.to_string())),
            None => Ok(None),
        }
    }

    /// After a first contact (nothing was expected): pins the key the server proved.
    pub fn learned(&self, rendezvous: &str, key: PublicKey) -> Result<(), ClientError> {
        let Some(home) = &self.home else {
            return Ok(());
        };
        home.pin_rendezvous(rendezvous, key)
            .map_err(|e| ClientError::Pin(e.to_string()))?;
        warn!(
            %rendezvous,
            %key,
            "pinned the rendezvous' key (first contact); to check it instead of trusting it, \
             compare with `rendezvous key` on the server, or give the peer {rendezvous}#{key}"
        );
        Ok(())
    }

    /// [`Trust::connect`] with default settings and `token`: one-off commands (`ls`,
    /// `release`).
    pub async fn connect_with_token(
        &self,
        rendezvous: &str,
        token: Option<String>,
    ) -> Result<Client, ClientError> {
        let config = ClientConfig {
            token,
            ..ClientConfig::default()
        };
        self.connect(rendezvous, config).await
    }

    /// Connects to `rendezvous` with `config`, insisting on the pinned key or pinning the
    /// one the server proves.
    pub async fn connect(
        &self,
        rendezvous: &str,
        mut config: ClientConfig,
    ) -> Result<Client, ClientError> {
        config.server_key = self.expected(rendezvous)?;
        let first = config.server_key.is_none();
        let client = Client::connect(rendezvous, config).await?;
        if first {
            self.learned(rendezvous, client.server_key())?;
        }
        Ok(client)
    }
}

pub use wire::signal::client::split_pinned as split;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_may_follow_the_address() {
        let k = PublicKey([0xab; 32]);
        assert_eq!(
            split(&format!("198.18.0.1:7000#{k}")).unwrap(),
            ("198.18.0.1:7000".to_owned(), Some(k))
        );
        assert_eq!(
            split("198.18.0.1:7000").unwrap(),
            ("198.18.0.1:7000".to_owned(), None)
        );
        let err = split("198.18.0.1:7000#abc").unwrap_err();
        assert!(err.contains("64 hex digits"), "{err}");
    }

    #[test]
    fn the_first_key_is_pinned_and_then_insisted_on() {
        let dir = std::env::temp_dir().join(format!(
            "chuantou-trust-{}",
            hex::encode(rand::random::<[u8; 8]>())
        ));
        let home = Home::open(Some(dir.clone())).unwrap();
        let trust = Trust {
            key: None,
            home: Some(home),
        };
        assert_eq!(trust.expected("198.18.0.1:7000").unwrap(), None);
        trust
            .learned("198.18.0.1:7000", PublicKey([1; 32]))
            .unwrap();
        assert_eq!(
            trust.expected("198.18.0.1:7000").unwrap(),
            Some(PublicKey([1; 32]))
        );
        assert_eq!(trust.expected("198.18.0.2:7000").unwrap(), None);
        // A configured key wins over the file.
        let configured = Trust {
            key: Some(PublicKey([2; 32])),
            ..trust
        };
        assert_eq!(
            configured.expected("198.18.0.1:7000").unwrap(),
            Some(PublicKey([2; 32]))
        );
        std::fs::remove_dir_all(dir).unwrap();
    }
}
