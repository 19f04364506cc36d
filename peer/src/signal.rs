//! Staying registered with the rendezvous: connect, register, and on any loss reconnect
//! with backoff. Shared by `expose` and `reach`.

use std::time::Duration;

use ed25519_dalek::SigningKey;
use rendezvous::client::{Client, ClientConfig, ClientError};
use rendezvous::proto::{ErrorCode, Service};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Where and how to register.
#[derive(Debug, Clone)]
pub struct Signaling {
    /// The rendezvous, `HOST:PORT`.
    pub rendezvous: String,
    /// Its token, if it wants one.
    pub token: Option<String>,
    /// Our name.
    pub name: String,
    /// What we offer.
    pub services: Vec<Service>,
}

/// Backoff between reconnection attempts: doubling from 1 s, capped at 30 s.
const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Errors no retry can fix: they end the command with a clear message.
pub fn is_fatal(e: &ClientError) -> bool {
    matches!(e, ClientError::Refused(f) if matches!(
        f.code,
        ErrorCode::NameTaken
            | ErrorCode::Unauthorized
            | ErrorCode::VersionMismatch
            | ErrorCode::InvalidName
            | ErrorCode::BadRequest
    ))
}

impl Signaling {
    /// Connects and registers once.
    pub async fn register(&self, key: &SigningKey) -> Result<Client, ClientError> {
        let client = Client::connect(
            &self.rendezvous,
            ClientConfig {
                token: self.token.clone(),
                ..ClientConfig::default()
            },
        )
        .await?;
        let reg = client
            .register(key, &self.name, self.services.clone(), vec![])
            .await?;
        info!(
            name = %self.name,
            rendezvous = %self.rendezvous,
            observed = %reg.observed_tcp,
            "{}",
            if reg.replaced { "re-registered" } else { "registered" }
        );
        Ok(client)
    }

    /// Registers, retrying with backoff until it works, a fatal refusal, or shutdown
    /// (`Ok(None)`).
    pub async fn register_until_up(
        &self,
        key: &SigningKey,
        shutdown: &CancellationToken,
    ) -> Result<Option<Client>, ClientError> {
        let mut wait = BACKOFF_MIN;
        loop {
            match self.register(key).await {
                Ok(c) => return Ok(Some(c)),
                Err(e) if is_fatal(&e) => return Err(e),
                Err(e) => {
                    warn!(error = %e, "rendezvous unavailable; retrying in {wait:?}");
                    tokio::select! {
                        _ = shutdown.cancelled() => return Ok(None),
                        _ = tokio::time::sleep(wait) => {}
                    }
                    wait = (wait * 2).min(BACKOFF_MAX);
                }
            }
        }
    }
}
