//! The master key: where it comes from, what is derived from it, and the check that the
//! key a gateway starts with is the key its data directory was made with.
//!
//! Sources: an environment variable (64 hex digits), a key file outside the data directory
//! (32 raw bytes or 64 hex digits), or a passphrase through Argon2id. The development source
//! keeps a generated key inside the data directory: convenient, and no protection at all.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rand::RngCore;
use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, Zeroizing};

use super::Sealer;
use super::environment;
use super::secret::{Secret, fill_random};

/// Where the `[keys]` section says the master key comes from.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "source", rename_all = "kebab-case", deny_unknown_fields)]
pub enum KeySource {
    /// A key generated at first start and kept in the data directory. For trying firn out.
    #[default]
    Dev,
    /// 64 hex digits in an environment variable.
    Env {
        #[serde(default = "default_key_env")]
        env: String,
    },
    /// A file outside the data directory holding 32 raw bytes or 64 hex digits.
    File { file: PathBuf },
    /// A passphrase in an environment variable, stretched by Argon2id. The salt (not secret)
    /// is kept in the data directory.
    Passphrase {
        #[serde(default = "default_passphrase_env")]
        env: String,
    },
}

fn default_key_env() -> String {
    "FIRN_MASTER_KEY".to_string()
}

fn default_passphrase_env() -> String {
    "FIRN_PASSPHRASE".to_string()
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("[keys] source = \"env\": environment variable {0} is not set")]
    EnvMissing(String),
    #[error("[keys] {what} must be 32 bytes written as 64 hex digits")]
    BadKey { what: String },
    #[error("[keys] file {path}: {source}")]
    File {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "[keys] file {0} is inside the data directory; a key kept beside the data it protects protects nothing. Move it elsewhere (or use source = \"dev\" for a trial)"
    )]
    FileInsideDataDir(PathBuf),
    #[error("[keys] source = \"passphrase\": environment variable {0} is not set or empty")]
    PassphraseMissing(String),
    #[error("key store in {path}: {source}")]
    Store {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the master key is not the one the data directory {0} was created with (its key check does not open). Start with the original key; a new key cannot read the existing data"
    )]
    WrongKey(PathBuf),
    #[error(
        "the key check {} is missing, but the data directory {} already holds data (meta.redb or volume files), so the master key cannot be verified. Restore the keycheck file from a backup of this data directory; firn writes a new key check only into a fresh data directory",
        .0.join(KEY_CHECK_FILE).display(),
        .0.display()
    )]
    KeyCheckMissing(PathBuf),
    #[error("passphrase stretching failed: {0}")]
    Argon2(String),
}

/// 32 bytes in locked memory that core dumps leave out, wiped when dropped (`Secret`).
/// Every source fills it in place, so no other copy of the key outlives loading.
pub struct MasterKey(Secret<32>);

impl MasterKey {
    /// For tests and tools: the caller's `bytes` are a copy this type cannot wipe.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        MasterKey(Secret::new_with(|key| *key = bytes))
    }

    pub fn generate() -> Self {
        MasterKey(Secret::new_with(|key| fill_random(key)))
    }

    pub fn to_hex(&self) -> Zeroizing<String> {
        let mut text = Zeroizing::new(vec![0u8; 64]);
        // 64 bytes for 32: the lengths match, so this cannot fail.
        let _ = hex::encode_to_slice(&self.0[..], &mut text);
        // Hex digits are ASCII, so this takes the buffer over without a copy.
        Zeroizing::new(String::from_utf8(std::mem::take(&mut *text)).unwrap_or_default())
    }

    fn from_hex(text: &[u8], what: &str) -> Result<Self, KeyError> {
        let mut key = Secret::zeroed();
        hex::decode_to_slice(text.trim_ascii(), &mut *key).map_err(|_| KeyError::BadKey {
            what: what.to_string(),
        })?;
        Ok(MasterKey(key))
    }

    /// A subkey for one purpose; `context` names the purpose and its version.
    pub fn derive(&self, context: &str) -> Secret<32> {
        Secret::new_with(|key| {
            // The same bytes as `blake3::derive_key`, written straight into the secret.
            let mut hasher = blake3::Hasher::new_derive_key(context);
            hasher.update(&*self.0);
            hasher.finalize_xof().fill(key);
            hasher.zeroize();
        })
    }

    /// Loads the master key from `source`. `data_dir` is where the dev key and the
    /// passphrase salt live.
    pub fn load(source: &KeySource, data_dir: &Path) -> Result<MasterKey, KeyError> {
        match source {
            KeySource::Dev => load_dev(data_dir),
            KeySource::Env { env } => {
                let text =
                    environment::variable(env).ok_or_else(|| KeyError::EnvMissing(env.clone()))?;
                MasterKey::from_hex(text.as_bytes(), &format!("environment variable {env}"))
            }
            KeySource::File { file } => load_file(file, data_dir),
            KeySource::Passphrase { env } => {
                let phrase = environment::variable(env)
                    .filter(|phrase| !phrase.is_empty())
                    .ok_or_else(|| KeyError::PassphraseMissing(env.clone()))?;
                let salt = read_or_create(&data_dir.join(SALT_FILE), || {
                    let mut salt = [0u8; 16];
                    rand::rng().fill_bytes(&mut salt);
                    Zeroizing::new(hex::encode(salt))
                })?;
                stretch(phrase.as_bytes(), salt.trim().as_bytes())
            }
        }
    }
}

/// The passphrase's salt in the data directory (and, put there by the daemon, in the bucket).
pub const SALT_FILE: &str = "passphrase.salt";

fn load_dev(data_dir: &Path) -> Result<MasterKey, KeyError> {
    let path = data_dir.join("dev-master-key");
    let text = read_or_create(&path, || MasterKey::generate().to_hex())?;
    MasterKey::from_hex(
        text.as_bytes(),
        &format!("development key file {}", path.display()),
    )
}

fn load_file(file: &Path, data_dir: &Path) -> Result<MasterKey, KeyError> {
    let file_error = |source| KeyError::File {
        path: file.to_path_buf(),
        source,
    };
    let canonical = fs::canonicalize(file).map_err(file_error)?;
    if let Ok(data) = fs::canonicalize(data_dir)
        && canonical.starts_with(data)
    {
        return Err(KeyError::FileInsideDataDir(file.to_path_buf()));
    }
    let bytes = Zeroizing::new(fs::read(file).map_err(file_error)?);
    let what = format!("file {}", file.display());
    if bytes.len() == 32 {
        return Ok(MasterKey(Secret::new_with(|key| {
            key.copy_from_slice(&bytes)
        })));
    }
    MasterKey::from_hex(&bytes, &what)
}

/// Argon2id with 64 MiB of memory and 3 passes: about a quarter second here, and costly to
/// guess at scale. The 64 MiB are wiped after: their first blocks would let a guess be
/// checked without paying for the stretching. (They are too large to lock; they live for
/// the quarter second only.)
fn stretch(phrase: &[u8], salt: &[u8]) -> Result<MasterKey, KeyError> {
    let params = argon2::Params::new(64 * 1024, 3, 1, Some(32))
        .map_err(|e| KeyError::Argon2(e.to_string()))?;
    let mut memory = Zeroizing::new(vec![argon2::Block::default(); params.block_count()]);
    let argon = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let mut key = Secret::zeroed();
    argon
        .hash_password_into_with_memory(phrase, salt, &mut *key, memory.as_mut_slice())
        .map_err(|e| KeyError::Argon2(e.to_string()))?;
    Ok(MasterKey(key))
}

/// Reads a small text file, or creates it (mode 0600, fsynced) with `make()`'s content.
/// Both are wiped when dropped: the development key is such a file.
fn read_or_create(
    path: &Path,
    make: impl FnOnce() -> Zeroizing<String>,
) -> Result<Zeroizing<String>, KeyError> {
    let store_error = |source| KeyError::Store {
        path: path.to_path_buf(),
        source,
    };
    match fs::read_to_string(path) {
        Ok(text) => return Ok(Zeroizing::new(text)),
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(store_error(e)),
        Err(_) => {}
    }
    let text = make();
    write_private(path, text.as_bytes()).map_err(store_error)?;
    Ok(text)
}

/// Writes a file only its owner can read, atomically and durably.
pub fn write_private(path: &Path, content: &[u8]) -> std::io::Result<()> {
    let staged = path.with_extension("new");
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&staged)?;
    file.write_all(content)?;
    file.sync_all()?;
    fs::rename(&staged, path)?;
    if let Some(parent) = path.parent() {
        fs::File::open(parent)?.sync_all()?;
    }
    Ok(())
}

const KEY_CHECK_FILE: &str = "keycheck";
const KEY_CHECK_CONTEXT: &[u8] = b"firn keycheck";
const KEY_CHECK_TEXT: &[u8] = b"firn: this data directory's master key";

/// Proves `sealer` holds the key this data directory was made with: opens the sealed
/// canary written at first start. The canary is written only into a fresh data directory
/// (no metadata store, no volume files): where data exists without a key check, any key
/// would pass a new one, and a wrong key would then read volumes as garbage and mix two
/// keys in them.
pub fn check_key(sealer: &Sealer, data_dir: &Path) -> Result<(), KeyError> {
    let path = data_dir.join(KEY_CHECK_FILE);
    let store_error = |source| KeyError::Store {
        path: path.clone(),
        source,
    };
    match fs::read(&path) {
        Ok(sealed) => match sealer.open(KEY_CHECK_CONTEXT, &sealed) {
            Ok(text) if text == KEY_CHECK_TEXT => Ok(()),
            _ => Err(KeyError::WrongKey(data_dir.to_path_buf())),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if !is_fresh(data_dir).map_err(store_error)? {
                return Err(KeyError::KeyCheckMissing(data_dir.to_path_buf()));
            }
            write_private(&path, &sealer.seal(KEY_CHECK_CONTEXT, KEY_CHECK_TEXT))
                .map_err(store_error)
        }
        Err(e) => Err(store_error(e)),
    }
}

/// Whether the data directory holds nothing the master key protects yet: no metadata store
/// and nothing in the volume directory.
fn is_fresh(data_dir: &Path) -> std::io::Result<bool> {
    if fs::symlink_metadata(data_dir.join("meta.redb")).is_ok() {
        return Ok(false);
    }
    match fs::read_dir(data_dir.join("volumes")) {
        Ok(mut entries) => Ok(entries.next().is_none()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(true),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_key_is_stable_and_private() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = MasterKey::load(&KeySource::Dev, dir.path()).expect("first load");
        let b = MasterKey::load(&KeySource::Dev, dir.path()).expect("second load");
        assert_eq!(*a.to_hex(), *b.to_hex());
        let mode = fs::metadata(dir.path().join("dev-master-key"))
            .expect("key file")
            .permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
    }

    #[test]
    fn wrong_key_is_detected_by_the_key_check() {
        let dir = tempfile::tempdir().expect("tempdir");
        let right = Sealer::new(&MasterKey::from_bytes([1; 32]));
        check_key(&right, dir.path()).expect("first start writes the check");
        check_key(&right, dir.path()).expect("same key passes");
        let wrong = Sealer::new(&MasterKey::from_bytes([2; 32]));
        assert!(matches!(
            check_key(&wrong, dir.path()),
            Err(KeyError::WrongKey(_))
        ));
    }

    #[test]
    fn a_missing_key_check_is_written_only_into_a_fresh_data_dir() {
        let key = Sealer::new(&MasterKey::from_bytes([1; 32]));
        for existing in ["meta.redb", "volumes/0123.img"] {
            let dir = tempfile::tempdir().expect("tempdir");
            fs::create_dir(dir.path().join("volumes")).expect("mkdir");
            fs::write(dir.path().join(existing), b"data").expect("write");
            let err = check_key(&key, dir.path()).expect_err(existing);
            assert!(matches!(err, KeyError::KeyCheckMissing(_)), "{err}");
            assert!(err.to_string().contains("Restore the keycheck"), "{err}");
            assert!(!dir.path().join(KEY_CHECK_FILE).exists());
        }
        let dir = tempfile::tempdir().expect("tempdir");
        fs::create_dir(dir.path().join("volumes")).expect("mkdir");
        check_key(&key, dir.path()).expect("an empty volume directory is fresh");
        assert!(dir.path().join(KEY_CHECK_FILE).exists());
    }

    #[test]
    fn key_file_inside_the_data_dir_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("master.key");
        fs::write(&file, [9u8; 32]).expect("write");
        let source = KeySource::File { file: file.clone() };
        assert!(matches!(
            MasterKey::load(&source, dir.path()),
            Err(KeyError::FileInsideDataDir(_))
        ));
        let other = tempfile::tempdir().expect("tempdir");
        let key = MasterKey::load(&source, other.path()).expect("outside is fine");
        assert_eq!(*key.to_hex(), hex::encode([9u8; 32]));
    }

    #[test]
    fn passphrase_keys_depend_on_phrase_and_salt() {
        let a = stretch(b"correct horse", b"salt-one-16bytes").expect("argon2");
        let b = stretch(b"correct horse", b"salt-one-16bytes").expect("argon2");
        let c = stretch(b"correct horsf", b"salt-one-16bytes").expect("argon2");
        let d = stretch(b"correct horse", b"salt-two-16bytes").expect("argon2");
        assert_eq!(*a.to_hex(), *b.to_hex());
        assert_ne!(*a.to_hex(), *c.to_hex());
        assert_ne!(*a.to_hex(), *d.to_hex());
    }

    #[test]
    fn derived_keys_are_blake3_derive_key() {
        // Written into locked memory by hand; must stay the bytes existing data was
        // sealed with.
        let master = MasterKey::from_bytes([5; 32]);
        assert_eq!(
            *master.derive("firn seal data key v1"),
            blake3::derive_key("firn seal data key v1", &[5; 32])
        );
    }

    #[test]
    fn bad_hex_keys_are_refused() {
        for text in ["", "abc", &"zz".repeat(32), &"00".repeat(31)] {
            assert!(
                MasterKey::from_hex(text.as_bytes(), "test").is_err(),
                "{text:?} accepted"
            );
        }
    }
}
