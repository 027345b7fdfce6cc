//! Who may connect and what they may do: users with SCRAM-SHA-256 verifiers (never passwords),
//! their tags and permissions, kept in `<data_dir>/users.json`, and the slowing of failed
//! logins.
//!
//! While no user is tagged `admin`, the built-in user `guest` (password `guest`, every
//! permission, admin) is in effect, from loopback addresses only: a fresh broker works with no
//! set-up, and cannot be reached from the network with a well-known password. Once an admin
//! exists, only the users in the file can connect.

mod access_log;
mod permissions;
mod throttle;

use std::collections::BTreeMap;
use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use hopper_proto::scram::{self, Verifier};
use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};
use sha2::Digest as _;

pub use access_log::{AccessEvent, AccessLog};
pub use permissions::{refused, Access, Permissions, Resource};
pub use throttle::LoginThrottle;

use crate::error::BrokerError;

/// The built-in user's name and password.
pub const DEFAULT_USER: &str = "guest";
/// The tag that lets a user manage users and permissions.
pub const ADMIN_TAG: &str = "admin";

/// File the users are kept in, in the data directory.
const USERS_FILE: &str = "users.json";

/// One user as the broker knows it.
#[derive(Debug, Clone)]
pub struct Account {
    /// Its name.
    pub name: String,
    /// Its tags (`admin`, or any label).
    pub tags: Vec<String>,
    /// What stands in for its password.
    pub verifier: Verifier,
    /// Its permissions, compiled.
    pub permissions: Permissions,
    /// Its API tokens (HTTP `Authorization: Bearer`), by name.
    pub tokens: Vec<Token>,
}

/// An API token: only a digest of it is kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    /// The name it was created under, unique per user.
    pub name: String,
    /// SHA-256 of the token.
    pub digest: [u8; 32],
    /// Unix ms of its creation.
    pub created_ms: u64,
    /// Unix ms after which it no longer works; 0 = never.
    pub expires_ms: u64,
}

/// Longest lifetime a token may be given: ten years.
pub const MAX_TOKEN_LIFETIME_MS: u64 = 10 * 366 * 24 * 3600 * 1000;

/// What tokens start with, so a leaked one is easy to spot (and to scan for).
const TOKEN_PREFIX: &str = "hopper_";

impl Account {
    /// True when tagged `admin`.
    pub fn is_admin(&self) -> bool {
        self.tags.iter().any(|t| t == ADMIN_TAG)
    }
}

/// Every user, and the file they are kept in.
pub struct Users {
    path: PathBuf,
    accounts: RwLock<BTreeMap<String, Arc<Account>>>,
    /// The built-in guest, used while no admin exists.
    guest: Arc<Account>,
    /// Serializes writes of the file.
    saving: Mutex<()>,
    /// Every token's digest, with its user.
    token_index: RwLock<std::collections::HashMap<[u8; 32], String>>,
    /// Secret for decoy verifiers of unknown users.
    secret: [u8; 32],
    /// Failed logins per source address.
    pub throttle: LoginThrottle,
    /// Refused logins and changes, for the operator.
    access_log: AccessLog,
    /// Passwords checked lately (HTTP Basic auth sends one with every request), by user: a
    /// digest of the password and the stored key it was checked against. Memory only.
    checked: Mutex<std::collections::HashMap<String, Checked>>,
}

/// A password that passed: its digest, and the stored key it was checked against.
type Checked = ([u8; 32], [u8; 32]);

impl Users {
    /// Loads the users kept in `data_dir` (none if the file does not exist yet).
    pub fn open(data_dir: &Path) -> io::Result<Users> {
        let path = data_dir.join(USERS_FILE);
        let saved: SavedUsers = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| io::Error::other(format!("{}: {e}", path.display())))?,
            Err(err) if err.kind() == io::ErrorKind::NotFound => SavedUsers::default(),
            Err(err) => return Err(err),
        };
        let mut accounts = BTreeMap::new();
        for user in saved.users {
            let account =
                user.into_account().map_err(|e| io::Error::other(format!("{}: {e}", path.display())))?;
            accounts.insert(account.name.clone(), Arc::new(account));
        }
        let guest = Account {
            name: DEFAULT_USER.into(),
            tags: vec![ADMIN_TAG.into()],
            // The built-in guest is checked against a low iteration count: its password is
            // public anyway, and it only works from loopback.
            verifier: Verifier::derive(DEFAULT_USER, b"hopper-guest", 4096),
            permissions: Permissions::all(),
            tokens: Vec::new(),
        };
        let token_index = RwLock::new(index_tokens(&accounts));
        Ok(Users {
            path,
            token_index,
            accounts: RwLock::new(accounts),
            guest: Arc::new(guest),
            saving: Mutex::new(()),
            secret: rand::random(),
            throttle: LoginThrottle::default(),
            access_log: AccessLog::open(&data_dir.join("audit"))?,
            checked: Mutex::default(),
        })
    }

    /// True while no admin user exists, so the built-in guest is in effect.
    pub fn default_user_active(&self) -> bool {
        !self.accounts.read().values().any(|a| a.is_admin())
    }

    /// The account `name` may log in as from `peer`, or why not. Unknown users get `None`
    /// (the caller then runs the exchange against a decoy, so they look like a wrong password).
    pub fn login_account(&self, name: &str, peer: IpAddr) -> Result<Option<Arc<Account>>, BrokerError> {
        if name == DEFAULT_USER && self.default_user_active() && !self.accounts.read().contains_key(name) {
            if !peer.is_loopback() {
                return Err(BrokerError::Unauthenticated(format!(
                    "user '{DEFAULT_USER}' may only connect from localhost (this connection comes from {peer}); \
                     on the broker's host, run `hopper user add NAME --tags admin` and connect as that user"
                )));
            }
            return Ok(Some(self.guest.clone()));
        }
        Ok(self.accounts.read().get(name).cloned())
    }

    /// The built-in guest, for a connection that did not authenticate: allowed from loopback
    /// while no admin exists.
    pub fn anonymous(&self, peer: IpAddr) -> Result<Arc<Account>, BrokerError> {
        if !self.default_user_active() {
            return Err(BrokerError::Unauthenticated(
                "authentication required: connect with a user and password (--user/--password, \
                 HOPPER_USER/HOPPER_PASSWORD, or hopper://user:pass@host:port)"
                    .into(),
            ));
        }
        self.login_account(DEFAULT_USER, peer)?
            .ok_or_else(|| BrokerError::Unauthenticated("the built-in user is not available".into()))
    }

    /// Checks a user and password sent in the clear (HTTP Basic auth, PLAIN over TLS) from
    /// `peer`: the account, or `Unauthenticated` after the address's failure delay. A
    /// password that passed once is remembered by digest, so a client sending it with every
    /// request does not pay the key derivation each time; changing the password forgets it.
    pub async fn check_password(
        &self,
        user: &str,
        password: &str,
        peer: IpAddr,
    ) -> Result<Arc<Account>, BrokerError> {
        let failed = |this: &Users| {
            let err = BrokerError::Unauthenticated(format!("authentication failed for user '{user}'"));
            (this.refused_login(peer, user, "http basic", &err), err)
        };
        let account = match self.login_account(user, peer)? {
            Some(account) => account,
            None => {
                // The same work as a known user, so the answer does not tell them apart.
                let _ = self.decoy(user).matches(password);
                let (delay, err) = failed(self);
                tokio::time::sleep(delay).await;
                return Err(err);
            }
        };
        let digest: [u8; 32] = sha2::Sha256::digest(password.as_bytes()).into();
        let remembered = self.checked.lock().get(user).copied();
        if remembered == Some((digest, account.verifier.stored_key)) {
            return Ok(account);
        }
        let verifier = account.verifier.clone();
        let owned = password.to_owned();
        let matches = tokio::task::spawn_blocking(move || verifier.matches(&owned)).await.unwrap_or(false);
        if !matches {
            let (delay, err) = failed(self);
            tokio::time::sleep(delay).await;
            return Err(err);
        }
        self.throttle.succeeded(peer);
        let mut checked = self.checked.lock();
        if checked.len() >= 10_000 {
            checked.clear();
        }
        checked.insert(user.to_owned(), (digest, account.verifier.stored_key));
        Ok(account)
    }

    /// A verifier for an unknown user: the exchange fails like a wrong password.
    pub fn decoy(&self, name: &str) -> Verifier {
        scram::decoy_verifier(name, &self.secret, scram::DEFAULT_ITERATIONS)
    }

    /// The current account of a logged-in user; `Err` if it was deleted since.
    pub fn current(&self, name: &str) -> Result<Arc<Account>, BrokerError> {
        if let Some(account) = self.accounts.read().get(name) {
            return Ok(account.clone());
        }
        if name == DEFAULT_USER && self.default_user_active() {
            return Ok(self.guest.clone());
        }
        Err(BrokerError::AccessRefused(format!("user '{name}' no longer exists")))
    }

    /// Every user, by name.
    pub fn list(&self) -> Vec<Arc<Account>> {
        self.accounts.read().values().cloned().collect()
    }

    /// Creates a user, or with `update` changes its password (unless `password` is `None`)
    /// and tags. New users get no permissions.
    pub fn put(
        &self,
        name: &str,
        password: Option<&str>,
        tags: Vec<String>,
        update: bool,
    ) -> Result<(), BrokerError> {
        let secret = password.map(UserSecret::derive).transpose()?;
        self.put_secret(name, secret.as_ref(), tags, update)
    }

    /// Like [`Users::put`], with the password's verifier derived already (on the node that
    /// took the request, when the cluster replicates the change).
    pub fn put_secret(
        &self,
        name: &str,
        secret: Option<&UserSecret>,
        tags: Vec<String>,
        update: bool,
    ) -> Result<(), BrokerError> {
        validate_user_name(name)?;
        for tag in &tags {
            if tag.is_empty() || tag.len() > 64 || tag.chars().any(|c| c.is_control() || c == ',') {
                return Err(BrokerError::InvalidArgument(format!("invalid tag '{tag}'")));
            }
        }
        let verifier = secret.map(|secret| secret.verifier(name)).transpose()?;
        self.change(|accounts| {
            let existing = accounts.get(name).cloned();
            let account = match (existing, update) {
                (Some(_), false) => {
                    return Err(BrokerError::PreconditionFailed(format!(
                        "user '{name}' exists; use `hopper user passwd` or `--update` to change it"
                    )))
                }
                (None, true) => return Err(BrokerError::NotFound(format!("no user named '{name}'"))),
                (Some(old), true) => Account {
                    name: name.into(),
                    tags,
                    verifier: verifier.unwrap_or_else(|| old.verifier.clone()),
                    permissions: old.permissions.clone(),
                    tokens: old.tokens.clone(),
                },
                (None, false) => Account {
                    name: name.into(),
                    tags,
                    verifier: verifier
                        .ok_or_else(|| BrokerError::InvalidArgument("a new user needs a password".into()))?,
                    permissions: Permissions::none(),
                    tokens: Vec::new(),
                },
            };
            accounts.insert(name.into(), Arc::new(account));
            Ok(())
        })
    }

    /// Every user, as the cluster replicates them.
    pub fn records(&self) -> Vec<UserRecord> {
        let accounts = self.accounts.read();
        let records = accounts.values().map(|account| UserRecord {
            name: account.name.clone(),
            tags: account.tags.clone(),
            secret: UserSecret::of(&account.verifier),
            permissions: account.permissions.patterns().clone(),
        });
        records.collect()
    }

    /// Deletes a user.
    pub fn delete(&self, name: &str) -> Result<(), BrokerError> {
        self.change(|accounts| match accounts.remove(name) {
            Some(_) => Ok(()),
            None => Err(BrokerError::NotFound(format!("no user named '{name}'"))),
        })
    }

    /// Sets a user's permissions.
    pub fn set_permissions(&self, name: &str, permissions: Permissions) -> Result<(), BrokerError> {
        self.change(|accounts| {
            let old =
                accounts.get(name).ok_or_else(|| BrokerError::NotFound(format!("no user named '{name}'")))?;
            let account = Account { permissions, ..Account::clone(old) };
            accounts.insert(name.into(), Arc::new(account));
            Ok(())
        })
    }

    /// Applies `change` to a copy of the users, writes it (atomically: a crash leaves the old
    /// file or the new one), then makes it current. Blocking file work: call from a blocking
    /// thread.
    fn change(
        &self,
        change: impl FnOnce(&mut BTreeMap<String, Arc<Account>>) -> Result<(), BrokerError>,
    ) -> Result<(), BrokerError> {
        let _saving = self.saving.lock();
        let mut accounts = self.accounts.read().clone();
        change(&mut accounts)?;
        let saved = SavedUsers { users: accounts.values().map(|a| SavedUser::of(a)).collect() };
        write_atomically(&self.path, &saved)
            .map_err(|e| BrokerError::ResourceLimit(format!("cannot save the users: {e}")))?;
        *self.token_index.write() = index_tokens(&accounts);
        *self.accounts.write() = accounts;
        Ok(())
    }

    /// Creates a token for `user` named `name`, working until `expires_ms` (0 = until
    /// deleted); returns it. It is shown this once: only its digest is kept.
    pub fn create_token(&self, user: &str, name: &str, expires_ms: u64) -> Result<String, BrokerError> {
        if name.is_empty() || name.len() > 255 || name.chars().any(char::is_control) {
            return Err(BrokerError::InvalidArgument(format!(
                "invalid token name '{}'",
                name.escape_debug()
            )));
        }
        let secret: [u8; 32] = rand::random();
        let token =
            format!("{TOKEN_PREFIX}{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret));
        let created_ms = crate::queue::now_ms();
        if expires_ms != 0 && expires_ms <= created_ms {
            return Err(BrokerError::InvalidArgument("the token would expire before it is made".into()));
        }
        if expires_ms > created_ms.saturating_add(MAX_TOKEN_LIFETIME_MS) {
            return Err(BrokerError::InvalidArgument("a token may live ten years at most".into()));
        }
        let digest: [u8; 32] = sha2::Sha256::digest(token.as_bytes()).into();
        self.change(|accounts| {
            let old = accounts.get(user).ok_or_else(|| {
                BrokerError::PreconditionFailed(format!(
                    "user '{user}' is not in the users file (the built-in guest has no tokens)"
                ))
            })?;
            if old.tokens.iter().any(|t| t.name == name) {
                return Err(BrokerError::PreconditionFailed(format!(
                    "user '{user}' has a token named '{name}' already"
                )));
            }
            let mut account = Account::clone(old);
            account.tokens.push(Token { name: name.into(), digest, created_ms, expires_ms });
            accounts.insert(user.into(), Arc::new(account));
            Ok(())
        })?;
        Ok(token)
    }

    /// Deletes `user`'s token `name`; it stops working at once.
    pub fn delete_token(&self, user: &str, name: &str) -> Result<(), BrokerError> {
        self.change(|accounts| {
            let old =
                accounts.get(user).ok_or_else(|| BrokerError::NotFound(format!("no user named '{user}'")))?;
            if !old.tokens.iter().any(|t| t.name == name) {
                return Err(BrokerError::NotFound(format!("user '{user}' has no token named '{name}'")));
            }
            let mut account = Account::clone(old);
            account.tokens.retain(|t| t.name != name);
            accounts.insert(user.into(), Arc::new(account));
            Ok(())
        })
    }

    /// The account a token belongs to, or `Unauthenticated` after the address's failure delay.
    pub async fn check_token(&self, token: &str, peer: IpAddr) -> Result<Arc<Account>, BrokerError> {
        let digest: [u8; 32] = sha2::Sha256::digest(token.as_bytes()).into();
        let user = self.token_index.read().get(&digest).cloned();
        let account = user.and_then(|user| self.accounts.read().get(&user).cloned());
        let now = crate::queue::now_ms();
        let valid = account.filter(|a| {
            a.tokens.iter().any(|t| t.digest == digest && (t.expires_ms == 0 || now < t.expires_ms))
        });
        match valid {
            Some(account) => {
                self.throttle.succeeded(peer);
                Ok(account)
            }
            None => {
                let err = BrokerError::Unauthenticated("the token is unknown, deleted or expired".into());
                let delay = self.refused_login(peer, "", "http bearer", &err);
                tokio::time::sleep(delay).await;
                Err(err)
            }
        }
    }

    /// Counts a refused login from `peer` (as `user`, by `mechanism`), logs it and writes it to
    /// the access log; returns how long to wait before answering it.
    pub fn refused_login(&self, peer: IpAddr, user: &str, mechanism: &str, err: &BrokerError) -> Duration {
        let delay = self.throttle.failed(peer);
        let failures = self.throttle.failures(peer);
        tracing::warn!(target: "hopper::access", %peer, user, mechanism, failures_in_a_row = failures, error = %err, "login refused");
        self.access_log.record(&AccessEvent {
            time_ms: crate::queue::now_ms(),
            event: "login_refused".into(),
            user: user.into(),
            by: String::new(),
            peer: peer.to_string(),
            detail: format!("{mechanism}: {err} ({failures} in a row from this address)"),
        });
        delay
    }

    /// Logs a change to users, permissions or tokens and writes it to the access log.
    pub fn changed(&self, event: &str, by: &str, user: &str, detail: String) {
        tracing::info!(target: "hopper::access", event, by, user, detail = %detail, "access changed");
        self.access_log.record(&AccessEvent {
            time_ms: crate::queue::now_ms(),
            event: event.into(),
            user: user.into(),
            by: by.into(),
            peer: String::new(),
            detail,
        });
    }
}

/// Every token's digest, with its user.
fn index_tokens(accounts: &BTreeMap<String, Arc<Account>>) -> std::collections::HashMap<[u8; 32], String> {
    accounts.values().flat_map(|a| a.tokens.iter().map(|t| (t.digest, a.name.clone()))).collect()
}

/// User names: 1 to 255 bytes of UTF-8, no control characters.
fn validate_user_name(name: &str) -> Result<(), BrokerError> {
    if name.is_empty() || name.len() > 255 || name.chars().any(char::is_control) {
        return Err(BrokerError::InvalidArgument(format!(
            "invalid user name '{}': 1 to 255 bytes, no control characters",
            name.escape_debug()
        )));
    }
    Ok(())
}

fn write_atomically(path: &Path, saved: &SavedUsers) -> io::Result<()> {
    let tmp = path.with_extension("json.tmp");
    let bytes = serde_json::to_vec_pretty(saved).map_err(io::Error::other)?;
    {
        use std::io::Write;
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(&bytes)?;
        file.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::File::open(dir)?.sync_all()
}

/// `users.json`.
#[derive(Debug, Default, Serialize, Deserialize)]
struct SavedUsers {
    users: Vec<SavedUser>,
}

#[derive(Debug, Serialize, Deserialize)]
struct SavedUser {
    name: String,
    tags: Vec<String>,
    scram_sha_256: SavedVerifier,
    permissions: SavedPermissions,
    #[serde(default)]
    tokens: Vec<SavedToken>,
}

#[derive(Debug, Serialize, Deserialize)]
struct SavedToken {
    name: String,
    sha256: String,
    created_ms: u64,
    expires_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct SavedVerifier {
    salt: String,
    iterations: u32,
    stored_key: String,
    server_key: String,
}

/// A password's SCRAM-SHA-256 verifier, as saved and as the cluster replicates it: never the
/// password itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserSecret(SavedVerifier);

impl UserSecret {
    /// Checks `password` and derives its verifier (a random salt, 4096 iterations).
    pub fn derive(password: &str) -> Result<UserSecret, BrokerError> {
        if password.is_empty() {
            return Err(BrokerError::InvalidArgument("the password must not be empty".into()));
        }
        if password.len() > 1024 {
            return Err(BrokerError::InvalidArgument("the password is longer than 1024 bytes".into()));
        }
        Ok(UserSecret::of(&Verifier::new(password, scram::DEFAULT_ITERATIONS)))
    }

    fn of(v: &Verifier) -> UserSecret {
        UserSecret(SavedVerifier {
            salt: BASE64.encode(&v.salt),
            iterations: v.iterations,
            stored_key: BASE64.encode(v.stored_key),
            server_key: BASE64.encode(v.server_key),
        })
    }

    fn verifier(&self, user: &str) -> Result<Verifier, BrokerError> {
        let invalid =
            |what: &str| BrokerError::InvalidArgument(format!("user '{user}': the {what} is not valid"));
        let key = |text: &str, what: &str| {
            BASE64
                .decode(text)
                .ok()
                .and_then(|bytes| <[u8; 32]>::try_from(bytes).ok())
                .ok_or_else(|| invalid(what))
        };
        let v = &self.0;
        Ok(Verifier {
            salt: BASE64.decode(&v.salt).map_err(|_| invalid("salt"))?,
            iterations: v.iterations,
            stored_key: key(&v.stored_key, "stored key")?,
            server_key: key(&v.server_key, "server key")?,
        })
    }
}

/// A user as the cluster replicates it: all but its API tokens, which stay on the node that
/// made them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserRecord {
    /// The user's name.
    pub name: String,
    /// Its tags.
    pub tags: Vec<String>,
    /// Its password's verifier.
    pub secret: UserSecret,
    /// Its permission patterns.
    pub permissions: SavedPermissions,
}

/// The patterns as given.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedPermissions {
    /// Declare, delete, purge, set alarms.
    pub configure: String,
    /// Publish to, bind to as destination.
    pub write: String,
    /// Consume, get, peek, move out of, bind from.
    pub read: String,
}

impl SavedUser {
    fn of(account: &Account) -> SavedUser {
        let v = &account.verifier;
        SavedUser {
            name: account.name.clone(),
            tags: account.tags.clone(),
            scram_sha_256: SavedVerifier {
                salt: BASE64.encode(&v.salt),
                iterations: v.iterations,
                stored_key: BASE64.encode(v.stored_key),
                server_key: BASE64.encode(v.server_key),
            },
            permissions: account.permissions.patterns().clone(),
            tokens: account
                .tokens
                .iter()
                .map(|t| SavedToken {
                    name: t.name.clone(),
                    sha256: BASE64.encode(t.digest),
                    created_ms: t.created_ms,
                    expires_ms: t.expires_ms,
                })
                .collect(),
        }
    }

    fn into_account(self) -> Result<Account, String> {
        let key = |text: &str, what: &str| -> Result<[u8; 32], String> {
            BASE64
                .decode(text)
                .ok()
                .and_then(|bytes| <[u8; 32]>::try_from(bytes).ok())
                .ok_or_else(|| format!("user '{}': {what} is not 32 bytes of base64", self.name))
        };
        let v = &self.scram_sha_256;
        let verifier = Verifier {
            salt: BASE64.decode(&v.salt).map_err(|e| format!("user '{}': salt: {e}", self.name))?,
            iterations: v.iterations,
            stored_key: key(&v.stored_key, "stored_key")?,
            server_key: key(&v.server_key, "server_key")?,
        };
        let permissions =
            Permissions::compile(self.permissions).map_err(|e| format!("user '{}': {e}", self.name))?;
        let mut tokens = Vec::new();
        for t in &self.tokens {
            let digest = key(&t.sha256, "a token's sha256")?;
            tokens.push(Token {
                name: t.name.clone(),
                digest,
                created_ms: t.created_ms,
                expires_ms: t.expires_ms,
            });
        }
        Ok(Account { name: self.name, tags: self.tags, verifier, permissions, tokens })
    }
}

#[cfg(test)]
mod tests;
