//! The peer's home directory: its ed25519 identity (`key`, made at first run), its settings
//! (`config.toml`), the keys it has pinned for names it reached (`known_peers`, trust on
//! first use, as ssh does) and for the rendezvous servers it spoke to (`known_rendezvous`). `--home DIR` or `CHUANTOU_HOME` choose it, so two peers can
//! run on one machine; the default is `$XDG_CONFIG_HOME/chuantou` or `~/.config/chuantou`.

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use ed25519_dalek::SigningKey;
use serde::Deserialize;
use wire::signal::PublicKey;

/// Why the home directory could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HomeError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The key file is not a key.
    #[error(
        "{path} is not a chuantou key (want 64 hex digits); move it away to make a new identity"
    )]
    BadKey {
        /// The file.
        path: PathBuf,
    },
    /// `config.toml` does not parse.
    #[error("{path}: {message}")]
    BadConfig {
        /// The file.
        path: PathBuf,
        /// The parser's words.
        message: String,
    },
    /// A pinned name now presents another key.
    #[error(
        "KEY MISMATCH for {name}: pinned {pinned} in {path}, but the rendezvous now says {offered}. \
         Someone may be impersonating {name}. If {name} really made a new key, remove its line \
         from {path}."
    )]
    KeyChanged {
        /// The name.
        name: String,
        /// The key on file.
        pinned: PublicKey,
        /// The key offered now.
        offered: PublicKey,
        /// The known_peers file.
        path: PathBuf,
    },
    /// No home directory can be worked out.
    #[error("no home directory: set --home, CHUANTOU_HOME or HOME")]
    NoHome,
    /// Another process of this home already registers the name.
    #[error(
        "{name} is already served from {home} by process {holder}; two processes with one \
         name would take it from each other forever: stop that one, or give this one \
         another --name (or --home)"
    )]
    NameBusy {
        /// The name.
        name: String,
        /// The home directory.
        home: PathBuf,
        /// The holder's PID and command, as it wrote them.
        holder: String,
    },
}

/// A name this process registers from its home, held until dropped (or the process ends:
/// the lock is the kernel's, so a crash leaves nothing stale).
#[derive(Debug)]
pub struct NameLock {
    _file: fs::File,
}

/// Settings read from `config.toml`; command-line flags and environment variables win.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// The rendezvous, `HOST:PORT` (or `HOST:PORT#KEY`).
    pub rendezvous: Option<String>,
    /// The rendezvous' key (what `rendezvous key` prints), pinned instead of learned.
    pub rendezvous_key: Option<String>,
    /// The rendezvous token.
    pub token: Option<String>,
    /// Ask the gateway for a port mapping (default true).
    pub port_mapping: Option<bool>,
    /// Services `peer up` exposes.
    #[serde(default)]
    pub expose: Vec<crate::up::ExposeEntry>,
    /// Peers `peer up` reaches.
    #[serde(default)]
    pub reach: Vec<crate::up::ReachEntry>,
}

/// An opened home directory.
#[derive(Debug, Clone)]
pub struct Home {
    dir: PathBuf,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> HomeError + '_ {
    move |source| HomeError::Io {
        path: path.to_owned(),
        source,
    }
}

impl Home {
    /// The directory to use: `explicit`, else `$XDG_CONFIG_HOME/chuantou`, else
    /// `~/.config/chuantou`. Created (mode 0700) if missing.
    pub fn open(explicit: Option<PathBuf>) -> Result<Home, HomeError> {
        let dir = match explicit {
            Some(d) => d,
            None => match std::env::var_os("XDG_CONFIG_HOME").filter(|v| !v.is_empty()) {
                Some(x) => PathBuf::from(x).join("chuantou"),
                None => PathBuf::from(std::env::var_os("HOME").ok_or(HomeError::NoHome)?)
                    .join(".config/chuantou"),
            },
        };
        fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let _ = fs::set_permissions(&dir, fs::Permissions::from_mode(0o700));
        Ok(Home { dir })
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Holds `name` for this process (`what` says how it was started, for the message
    /// another process gets): one home, one process per name.
    pub fn hold_name(&self, name: &str, what: &str) -> Result<NameLock, HomeError> {
        use std::io::{Read as _, Seek as _};
        let dir = self.dir.join("names");
        fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let path = dir.join(format!("{name}.lock"));
        let mut file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(io_err(&path))?;
        match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {
                let note = format!("{} ({what})", std::process::id());
                file.set_len(0)
                    .and_then(|()| file.seek(std::io::SeekFrom::Start(0)).map(drop))
                    .and_then(|()| file.write_all(note.as_bytes()))
                    .map_err(io_err(&path))?;
                Ok(NameLock { _file: file })
            }
            Err(rustix::io::Errno::WOULDBLOCK) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                Err(HomeError::NameBusy {
                    name: name.to_owned(),
                    home: self.dir.clone(),
                    holder: if holder.trim().is_empty() {
                        "(unknown)".into()
                    } else {
                        holder.trim().to_owned()
                    },
                })
            }
            Err(e) => Err(io_err(&path)(e.into())),
        }
    }

    /// The identity key, made (and saved with mode 0600) on first use.
    pub fn key(&self) -> Result<SigningKey, HomeError> {
        let path = self.dir.join("key");
        match fs::read_to_string(&path) {
            Ok(text) => {
                let bytes = hex::decode(text.trim())
                    .map_err(|_| HomeError::BadKey { path: path.clone() })?;
                let seed: [u8; 32] = bytes
                    .try_into()
                    .map_err(|_| HomeError::BadKey { path: path.clone() })?;
                Ok(SigningKey::from_bytes(&seed))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key = SigningKey::from_bytes(&rand_seed());
                let mut f = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&path)
                    .map_err(io_err(&path))?;
                writeln!(f, "{}", hex::encode(key.to_bytes())).map_err(io_err(&path))?;
                tracing::info!(path = %path.display(), "made a new identity key");
                Ok(key)
            }
            Err(e) => Err(io_err(&path)(e)),
        }
    }

    /// `config.toml`, or defaults when there is none.
    pub fn config(&self) -> Result<FileConfig, HomeError> {
        let path = self.dir.join("config.toml");
        match fs::read_to_string(&path) {
            Ok(text) => toml::from_str(&text).map_err(|e| HomeError::BadConfig {
                path,
                message: e.to_string(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(FileConfig::default()),
            Err(e) => Err(io_err(&path)(e)),
        }
    }

    /// Checks `name`'s key against `known_peers`, pinning it on first contact.
    pub fn pin(&self, name: &str, key: PublicKey) -> Result<Pinned, HomeError> {
        let path = self.dir.join("known_peers");
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(io_err(&path)(e)),
        };
        for line in text.lines() {
            let mut parts = line.split_whitespace();
            let (Some(n), Some(k)) = (parts.next(), parts.next()) else {
                continue;
            };
            if n != name {
                continue;
            }
            let pinned = hex::decode(k)
                .ok()
                .and_then(|b| <[u8; 32]>::try_from(b).ok())
                .map(PublicKey);
            return match pinned {
                Some(p) if p == key => Ok(Pinned::Known),
                Some(p) => Err(HomeError::KeyChanged {
                    name: name.to_owned(),
                    pinned: p,
                    offered: key,
                    path,
                }),
                None => Err(HomeError::BadConfig {
                    path,
                    message: format!("unreadable key for {name}"),
                }),
            };
        }
        let mut f = fs::OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .open(&path)
            .map_err(io_err(&path))?;
        writeln!(f, "{name} {key}").map_err(io_err(&path))?;
        Ok(Pinned::New)
    }
}

impl Home {
    /// The key pinned for the rendezvous `addr` (`HOST:PORT`) in `known_rendezvous`, if any.
    pub fn rendezvous_pin(&self, addr: &str) -> Result<Option<PublicKey>, HomeError> {
        let path = self.dir.join("known_rendezvous");
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(&path)(e)),
        };
        for line in text.lines() {
            let mut parts = line.split_whitespace();
            let (Some(a), Some(k)) = (parts.next(), parts.next()) else {
                continue;
            };
            if a == addr {
                return k.parse().map(Some).map_err(|m| HomeError::BadConfig {
                    path: path.clone(),
                    message: format!("{addr}: {m}"),
                });
            }
        }
        Ok(None)
    }

    /// Pins `key` for the rendezvous `addr` (first contact).
    pub fn pin_rendezvous(&self, addr: &str, key: PublicKey) -> Result<(), HomeError> {
        let path = self.dir.join("known_rendezvous");
        let mut f = fs::OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .open(&path)
            .map_err(io_err(&path))?;
        writeln!(f, "{addr} {key}").map_err(io_err(&path))
    }
}

/// The outcome of a pin check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pinned {
    /// The key matched the one on file.
    Known,
    /// First contact: the key was written down.
    New,
}

fn rand_seed() -> [u8; 32] {
    rand::random()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_home() -> Home {
        let dir = std::env::temp_dir().join(format!("chuantou-home-{}", hex::encode(rand_seed())));
        Home::open(Some(dir)).unwrap()
    }

    #[test]
    fn key_is_made_once_and_kept() {
        let h = temp_home();
        let a = h.key().unwrap();
        let b = h.key().unwrap();
        assert_eq!(a.to_bytes(), b.to_bytes());
        let mode = fs::metadata(h.dir().join("key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        fs::remove_dir_all(h.dir()).unwrap();
    }

    #[test]
    fn pinning_is_trust_on_first_use_and_loud_on_change() {
        let h = temp_home();
        assert_eq!(h.pin("pc-home", PublicKey([1; 32])).unwrap(), Pinned::New);
        assert_eq!(h.pin("pc-home", PublicKey([1; 32])).unwrap(), Pinned::Known);
        assert_eq!(h.pin("other", PublicKey([2; 32])).unwrap(), Pinned::New);
        let err = h.pin("pc-home", PublicKey([3; 32])).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("KEY MISMATCH for pc-home"), "{text}");
        assert!(text.contains(&PublicKey([1; 32]).to_string()), "{text}");
        assert!(text.contains(&PublicKey([3; 32]).to_string()), "{text}");
        fs::remove_dir_all(h.dir()).unwrap();
    }

    #[test]
    fn config_file_is_read_and_typos_are_refused() {
        let h = temp_home();
        assert!(h.config().unwrap().rendezvous.is_none());
        fs::write(
            h.dir().join("config.toml"),
            "rendezvous = \"198.18.0.1:7000\"\n",
        )
        .unwrap();
        assert_eq!(
            h.config().unwrap().rendezvous.as_deref(),
            Some("198.18.0.1:7000")
        );
        fs::write(h.dir().join("config.toml"), "rendevous = \"x\"\n").unwrap();
        assert!(h.config().unwrap_err().to_string().contains("rendevous"));
        fs::remove_dir_all(h.dir()).unwrap();
    }
}
