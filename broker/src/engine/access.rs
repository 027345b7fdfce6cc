//! Users and permissions through the engine: the check every operation makes, and managing
//! users, which only admins may do. The user file is written on a blocking thread.

use std::sync::Arc;

use super::{blocking, Access, Account, Caller, Engine, Resource};
use crate::auth::{self, Permissions, SavedPermissions, Users};
use crate::error::BrokerError;

/// A user as shown by `hopper user list` and `whoami`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserView {
    /// Its name.
    pub name: String,
    /// Its tags.
    pub tags: Vec<String>,
    /// Its permission patterns.
    pub permissions: SavedPermissions,
}

impl UserView {
    fn of(account: &Account) -> Self {
        UserView {
            name: account.name.clone(),
            tags: account.tags.clone(),
            permissions: account.permissions.patterns().clone(),
        }
    }
}

/// A connection counted against its user's connection limit, until dropped.
pub struct UserConnection {
    engine: Arc<Engine>,
    user: Arc<str>,
}

impl Drop for UserConnection {
    fn drop(&mut self) {
        let mut counts = self.engine.user_connections.lock();
        if let Some(count) = counts.get_mut(&self.user) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.user);
            }
        }
    }
}

impl Engine {
    /// Counts a new connection of `user`, or refuses it past `max_connections_per_user`.
    pub fn user_connected(self: &Arc<Self>, user: &str) -> Result<UserConnection, BrokerError> {
        let limit = self.config.max_connections_per_user;
        let mut counts = self.user_connections.lock();
        let count = counts.entry(Arc::from(user)).or_insert(0);
        if *count >= limit {
            return Err(BrokerError::ResourceLimit(format!(
                "user '{user}' has {limit} connections open, the most it may (--max-connections-per-user)"
            )));
        }
        *count += 1;
        Ok(UserConnection { engine: self.clone(), user: Arc::from(user) })
    }

    /// The users, for the handshake.
    pub fn users(&self) -> &Arc<Users> {
        &self.users
    }

    /// Refuses, with ACCESS_REFUSED naming the user, the operation, the resource and the
    /// permission it lacks, unless the caller's user has `access` to `resource`. The broker's
    /// own work passes.
    pub fn check(
        &self,
        caller: &Caller,
        operation: &str,
        access: Access,
        resource: Resource<'_>,
    ) -> Result<(), BrokerError> {
        let Some(user) = &caller.user else { return Ok(()) };
        let account = self.users.current(user)?;
        if account.permissions.allows(access, resource) {
            Ok(())
        } else {
            Err(auth::refused(user, operation, access, resource))
        }
    }

    /// Refuses `what` unless the caller's user is tagged `admin`.
    pub fn require_admin(&self, caller: &Caller, what: &str) -> Result<(), BrokerError> {
        let Some(user) = &caller.user else { return Ok(()) };
        if self.users.current(user)?.is_admin() {
            Ok(())
        } else {
            Err(BrokerError::AccessRefused(format!("user '{user}' is not tagged admin, which {what} needs")))
        }
    }

    /// The caller's user, tags and permissions.
    pub fn whoami(&self, caller: &Caller) -> Result<UserView, BrokerError> {
        let user = caller.user.as_deref().unwrap_or(auth::DEFAULT_USER);
        Ok(UserView::of(&*self.users.current(user)?))
    }

    /// Every user, and whether the built-in guest is in effect (no admin exists). Admin only.
    pub fn list_users(&self, caller: &Caller) -> Result<(Vec<UserView>, bool), BrokerError> {
        self.require_admin(caller, "listing users")?;
        let users = self.users.list().iter().map(|a| UserView::of(a)).collect();
        Ok((users, self.users.default_user_active()))
    }

    /// Creates a user or (with `update`) changes its password and tags. Admin only.
    pub async fn put_user(
        &self,
        caller: &Caller,
        name: String,
        password: Option<String>,
        tags: Vec<String>,
        update: bool,
    ) -> Result<(), BrokerError> {
        self.require_admin(caller, "managing users")?;
        let who = caller.user.as_deref().unwrap_or("broker").to_owned();
        if let Some(cluster) = self.cluster.get() {
            // Derived here: the password itself never leaves this node.
            let secret = password.as_deref().map(crate::auth::UserSecret::derive).transpose()?;
            let has_password = secret.is_some();
            let put = crate::cluster::MetaCommand::PutUser {
                name: name.clone(),
                tags: tags.clone(),
                secret,
                update,
            };
            cluster.write(put).await?;
            let event = if update { "user_changed" } else { "user_added" };
            let detail =
                format!("tags [{}]{}", tags.join(","), if has_password { ", password set" } else { "" });
            self.users.changed(event, &who, &name, detail);
            return Ok(());
        }
        let users = self.users.clone();
        blocking(move || {
            users.put(&name, password.as_deref(), tags.clone(), update)?;
            let event = if update { "user_changed" } else { "user_added" };
            let detail = format!(
                "tags [{}]{}",
                tags.join(","),
                if password.is_some() { ", password set" } else { "" }
            );
            users.changed(event, &who, &name, detail);
            Ok(())
        })
        .await
    }

    /// Deletes a user. Admin only; nobody deletes themselves (that is how the last admin
    /// locks everyone out).
    pub async fn delete_user(&self, caller: &Caller, name: String) -> Result<(), BrokerError> {
        self.require_admin(caller, "managing users")?;
        if caller.user.as_deref() == Some(name.as_str()) {
            return Err(BrokerError::PreconditionFailed(format!(
                "user '{name}' cannot delete itself; connect as another admin"
            )));
        }
        let who = caller.user.as_deref().unwrap_or("broker").to_owned();
        if let Some(cluster) = self.cluster.get() {
            cluster.catch_up().await?;
            self.users.current(&name)?;
            cluster.write(crate::cluster::MetaCommand::DeleteUser { name: name.clone() }).await?;
            self.users.changed("user_deleted", &who, &name, String::new());
            return Ok(());
        }
        let users = self.users.clone();
        blocking(move || {
            users.delete(&name)?;
            users.changed("user_deleted", &who, &name, String::new());
            Ok(())
        })
        .await
    }

    /// Sets a user's permission patterns. Admin only.
    pub async fn set_permissions(
        &self,
        caller: &Caller,
        name: String,
        patterns: SavedPermissions,
    ) -> Result<(), BrokerError> {
        self.require_admin(caller, "setting permissions")?;
        let permissions = Permissions::compile(patterns.clone())?;
        let who = caller.user.as_deref().unwrap_or("broker").to_owned();
        if let Some(cluster) = self.cluster.get() {
            let detail = format!(
                "configure '{}' write '{}' read '{}'",
                patterns.configure, patterns.write, patterns.read
            );
            let set =
                crate::cluster::MetaCommand::SetPermissions { name: name.clone(), permissions: patterns };
            cluster.write(set).await?;
            self.users.changed("permissions_set", &who, &name, detail);
            return Ok(());
        }
        let users = self.users.clone();
        blocking(move || {
            users.set_permissions(&name, permissions)?;
            let detail = format!(
                "configure '{}' write '{}' read '{}'",
                patterns.configure, patterns.write, patterns.read
            );
            users.changed("permissions_set", &who, &name, detail);
            Ok(())
        })
        .await
    }
}

/// An API token as listed: never the token itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenView {
    /// Its name.
    pub name: String,
    /// Unix ms of its creation.
    pub created_ms: u64,
    /// Unix ms after which it stops working; 0 = never.
    pub expires_ms: u64,
}

impl Engine {
    /// Creates an API token for the caller's own user, acting with that user's permissions
    /// (whatever they are when it is used) until `expires_ms` (0 = until deleted). Returns the
    /// token, shown this once.
    pub async fn create_token(
        &self,
        caller: &Caller,
        name: String,
        expires_ms: u64,
    ) -> Result<String, BrokerError> {
        let user = own_user(caller)?;
        let users = self.users.clone();
        blocking(move || {
            let token = users.create_token(&user, &name, expires_ms)?;
            users.changed("token_created", &user, &user, format!("token '{name}', expires_ms {expires_ms}"));
            Ok(token)
        })
        .await
    }

    /// The caller's tokens.
    pub fn list_tokens(&self, caller: &Caller) -> Result<Vec<TokenView>, BrokerError> {
        let user = own_user(caller)?;
        let account = self.users.current(&user)?;
        Ok(account
            .tokens
            .iter()
            .map(|t| TokenView { name: t.name.clone(), created_ms: t.created_ms, expires_ms: t.expires_ms })
            .collect())
    }

    /// Deletes one of the caller's tokens; it stops working at once.
    pub async fn delete_token(&self, caller: &Caller, name: String) -> Result<(), BrokerError> {
        let user = own_user(caller)?;
        let users = self.users.clone();
        blocking(move || {
            users.delete_token(&user, &name)?;
            users.changed("token_deleted", &user, &user, format!("token '{name}'"));
            Ok(())
        })
        .await
    }
}

fn own_user(caller: &Caller) -> Result<String, BrokerError> {
    caller.user.as_deref().map(str::to_owned).ok_or_else(|| {
        BrokerError::PreconditionFailed("tokens belong to users; the broker itself has none".into())
    })
}
