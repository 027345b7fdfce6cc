//! Users and permissions: who this connection is, and (for admins) managing users and what
//! they may do.

use hopper_proto::{pb, Body};

use crate::connection::Connection;
use crate::error::Result;
use crate::shared::unexpected;

/// What a user may do: three patterns (regular expressions matched against whole queue and
/// exchange names, as RabbitMQ's). An empty pattern matches nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Permissions {
    /// Declare, delete, purge, set alarms.
    pub configure: String,
    /// Publish to; bind to as the destination.
    pub write: String,
    /// Consume, get, peek, move out of; bind from.
    pub read: String,
}

impl Permissions {
    /// Everything on every name (`.*` three times).
    pub fn all() -> Self {
        Permissions { configure: ".*".into(), write: ".*".into(), read: ".*".into() }
    }
}

impl From<Option<pb::Permissions>> for Permissions {
    fn from(p: Option<pb::Permissions>) -> Self {
        let p = p.unwrap_or_default();
        Permissions { configure: p.configure, write: p.write, read: p.read }
    }
}

impl From<Permissions> for pb::Permissions {
    fn from(p: Permissions) -> Self {
        pb::Permissions { configure: p.configure, write: p.write, read: p.read }
    }
}

/// A user as the broker describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserInfo {
    /// Its name.
    pub name: String,
    /// Its tags; `admin` manages users and permissions.
    pub tags: Vec<String>,
    /// Its permissions.
    pub permissions: Permissions,
}

impl From<pb::UserInfo> for UserInfo {
    fn from(user: pb::UserInfo) -> Self {
        UserInfo { name: user.name, tags: user.tags, permissions: user.permissions.into() }
    }
}

/// The users, and whether the built-in guest is in effect (no admin exists yet).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserList {
    /// Every user, by name.
    pub users: Vec<UserInfo>,
    /// True while no user is tagged admin: `guest`/`guest` works from the broker's host.
    pub default_user: bool,
}

impl Connection {
    /// This connection's user, its tags and permissions, and how it logged in.
    pub async fn whoami(&self) -> Result<(UserInfo, String)> {
        match self.call(Body::WhoAmI(pb::WhoAmI {})).await? {
            Body::WhoAmIOk(ok) => Ok((ok.user.unwrap_or_default().into(), ok.mechanism)),
            other => Err(unexpected("WhoAmIOk", &other)),
        }
    }

    /// Every user. Needs the admin tag.
    pub async fn list_users(&self) -> Result<UserList> {
        match self.call(Body::UserList(pb::UserList {})).await? {
            Body::UserListOk(ok) => Ok(UserList {
                users: ok.users.into_iter().map(UserInfo::from).collect(),
                default_user: ok.default_user,
            }),
            other => Err(unexpected("UserListOk", &other)),
        }
    }

    /// Creates a user with no permissions yet. Needs the admin tag. The password is sent once,
    /// for the broker to derive its SCRAM verifier; it is not stored.
    pub async fn add_user(&self, name: &str, password: &str, tags: &[String]) -> Result<()> {
        let put = pb::UserPut {
            name: name.into(),
            password: password.into(),
            tags: tags.to_vec(),
            update: false,
            keep_password: false,
        };
        self.access(Body::UserPut(put)).await
    }

    /// Changes a user's password (when given) and tags. Needs the admin tag.
    pub async fn update_user(&self, name: &str, password: Option<&str>, tags: &[String]) -> Result<()> {
        let put = pb::UserPut {
            name: name.into(),
            password: password.unwrap_or_default().into(),
            tags: tags.to_vec(),
            update: true,
            keep_password: password.is_none(),
        };
        self.access(Body::UserPut(put)).await
    }

    /// Deletes a user. Needs the admin tag; nobody can delete themselves.
    pub async fn delete_user(&self, name: &str) -> Result<()> {
        self.access(Body::UserDelete(pb::UserDelete { name: name.into() })).await
    }

    /// Sets a user's permissions. Needs the admin tag.
    pub async fn set_permissions(&self, user: &str, permissions: Permissions) -> Result<()> {
        let set = pb::PermissionsSet { user: user.into(), permissions: Some(permissions.into()) };
        self.access(Body::PermissionsSet(set)).await
    }

    async fn access(&self, body: Body) -> Result<()> {
        match self.call(body).await? {
            Body::AccessOk(_) => Ok(()),
            other => Err(unexpected("AccessOk", &other)),
        }
    }
}

/// An API token as listed: its name and times, never the token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenInfo {
    /// Its name.
    pub name: String,
    /// Unix ms of its creation.
    pub created_ms: u64,
    /// Unix ms after which it stops working; 0 = never.
    pub expires_ms: u64,
}

impl Connection {
    /// Creates an API token for this connection's user (for HTTP `Authorization: Bearer`),
    /// working until `expires_ms` (Unix ms; 0 = until deleted). Returns the token, which the
    /// broker shows only this once.
    pub async fn create_token(&self, name: &str, expires_ms: u64) -> Result<String> {
        let create = pb::TokenCreate { name: name.into(), expires_ms };
        match self.call(Body::TokenCreate(create)).await? {
            Body::TokenCreateOk(ok) => Ok(ok.token),
            other => Err(unexpected("TokenCreateOk", &other)),
        }
    }

    /// This connection's user's tokens.
    pub async fn list_tokens(&self) -> Result<Vec<TokenInfo>> {
        match self.call(Body::TokenList(pb::TokenList {})).await? {
            Body::TokenListOk(ok) => Ok(ok
                .tokens
                .into_iter()
                .map(|t| TokenInfo { name: t.name, created_ms: t.created_ms, expires_ms: t.expires_ms })
                .collect()),
            other => Err(unexpected("TokenListOk", &other)),
        }
    }

    /// Deletes one of this connection's user's tokens; it stops working at once.
    pub async fn delete_token(&self, name: &str) -> Result<()> {
        self.access(Body::TokenDelete(pb::TokenDelete { name: name.into() })).await
    }
}
