//! The rendezvous' state directory: what must survive a restart. For now its identity
//! (`identity.key`: the ed25519 key signaling's TLS proves, which peers and relays pin),
//! made at first start with mode 0600. `--state DIR` chooses it; the default follows
//! systemd (`$STATE_DIRECTORY`), then `$XDG_STATE_HOME/chuantou-rendezvous`, then
//! `~/.local/state/chuantou-rendezvous`.

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use ed25519_dalek::SigningKey;

/// Why the state directory could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StateError {
    /// A file or the directory could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// Which.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The identity file is not a key.
    #[error(
        "{path} is not a rendezvous identity (want 64 hex digits); restore it from a backup, \
         or move it away to make a new one (every peer will then refuse the new key until \
         its pin is updated)"
    )]
    BadKey {
        /// The file.
        path: PathBuf,
    },
    /// No directory can be worked out.
    #[error("no state directory: pass --state DIR, or set STATE_DIRECTORY, XDG_STATE_HOME or HOME")]
    NoDir,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StateError + '_ {
    move |source| StateError::Io {
        path: path.to_owned(),
        source,
    }
}

/// An opened state directory.
#[derive(Debug, Clone)]
pub struct State {
    dir: PathBuf,
}

impl State {
    /// The default directory when `--state` is not given.
    pub fn default_dir() -> Result<PathBuf, StateError> {
        let var = |k| {
            std::env::var_os(k)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        };
        if let Some(d) = var("STATE_DIRECTORY") {
            // systemd may list several, separated by ':'; the first is ours.
            let first = d
                .to_string_lossy()
                .split(':')
                .next()
                .unwrap_or("")
                .to_owned();
            return Ok(PathBuf::from(first));
        }
        if let Some(x) = var("XDG_STATE_HOME") {
            return Ok(x.join("chuantou-rendezvous"));
        }
        var("HOME")
            .map(|h| h.join(".local/state/chuantou-rendezvous"))
            .ok_or(StateError::NoDir)
    }

    /// Opens `dir` (created with mode 0700 if missing).
    pub fn open(dir: PathBuf) -> Result<State, StateError> {
        fs::create_dir_all(&dir).map_err(io(&dir))?;
        let _ = fs::set_permissions(&dir, fs::Permissions::from_mode(0o700));
        Ok(State { dir })
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The identity, made on first use. Two processes starting at once on one directory
    /// end up with the same key: the file appears whole (written aside, then linked into
    /// place) or not at all.
    pub fn identity(&self) -> Result<(SigningKey, bool), StateError> {
        let path = self.dir.join("identity.key");
        match fs::read_to_string(&path) {
            Ok(text) => return Ok((parse(&text, &path)?, false)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(&path)(e)),
        }
        let key = SigningKey::from_bytes(&rand::random());
        let tmp = self.dir.join(format!(
            "identity.key.{}.{}",
            std::process::id(),
            hex::encode(rand::random::<[u8; 4]>())
        ));
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io(&tmp))?;
        writeln!(f, "{}", hex::encode(key.to_bytes())).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
        let linked = fs::hard_link(&tmp, &path);
        let _ = fs::remove_file(&tmp);
        match linked {
            Ok(()) => Ok((key, true)),
            // Another process made one first: use that.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let text = fs::read_to_string(&path).map_err(io(&path))?;
                Ok((parse(&text, &path)?, false))
            }
            Err(e) => Err(io(&path)(e)),
        }
    }
}

fn parse(text: &str, path: &Path) -> Result<SigningKey, StateError> {
    let bad = || StateError::BadKey {
        path: path.to_owned(),
    };
    let bytes = hex::decode(text.trim()).map_err(|_| bad())?;
    let seed: [u8; 32] = bytes.try_into().map_err(|_| bad())?;
    Ok(SigningKey::from_bytes(&seed))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp() -> PathBuf {
        std::env::temp_dir().join(format!(
            "chuantou-state-{}",
            hex::encode(rand::random::<[u8; 8]>())
        ))
    }

    #[test]
    fn the_identity_is_made_once_and_kept_private() {
        let dir = temp();
        let s = State::open(dir.clone()).unwrap();
        let (a, made) = s.identity().unwrap();
        assert!(made);
        let (b, made) = State::open(dir.clone()).unwrap().identity().unwrap();
        assert!(!made);
        assert_eq!(a.to_bytes(), b.to_bytes());
        let mode = fs::metadata(dir.join("identity.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let leftovers: Vec<_> = fs::read_dir(&dir).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "only the key file remains");
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_damaged_identity_is_an_error_not_a_new_key() {
        let dir = temp();
        let s = State::open(dir.clone()).unwrap();
        fs::write(dir.join("identity.key"), "not a key\n").unwrap();
        let err = s.identity().unwrap_err().to_string();
        assert!(err.contains("not a rendezvous identity"), "{err}");
        fs::remove_dir_all(dir).unwrap();
    }
}
