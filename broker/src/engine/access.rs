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

impl Engine {
    /// The users, for the handshake.
    pub fn users(&self) -> &Arc<Users> {
        &self.users
    }

    /// Refuses, with ACCESS_REFUSED naming the user, the permission and the resource, unless
    /// the caller's user has `access` to `resource`. The broker's own work passes.
    pub fn check(&self, caller: &Caller, access: Access, resource: Resource<'_>) -> Result<(), BrokerError> {
        let Some(user) = &caller.user else { return Ok(()) };
        let account = self.users.current(user)?;
        if account.permissions.allows(access, resource) {
            Ok(())
        } else {
            Err(auth::refused(user, access, resource))
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
        let users = self.users.clone();
        let who = caller.user.as_deref().unwrap_or("broker").to_owned();
        blocking(move || {
            users.put(&name, password.as_deref(), tags.clone(), update)?;
            let verb = if update { "changed" } else { "added" };
            tracing::info!(target: "hopper::access", by = %who, user = %name, ?tags, password_changed = password.is_some(), "user {verb}");
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
        let users = self.users.clone();
        let who = caller.user.as_deref().unwrap_or("broker").to_owned();
        blocking(move || {
            users.delete(&name)?;
            tracing::info!(target: "hopper::access", by = %who, user = %name, "user deleted");
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
        let users = self.users.clone();
        let who = caller.user.as_deref().unwrap_or("broker").to_owned();
        blocking(move || {
            users.set_permissions(&name, permissions)?;
            tracing::info!(
                target: "hopper::access",
                by = %who, user = %name,
                configure = %patterns.configure, write = %patterns.write, read = %patterns.read,
                "permissions set"
            );
            Ok(())
        })
        .await
    }
}
