//! `hopper user ...`, `hopper permissions ...` and `hopper whoami`: users, what they may do,
//! and who you are.

use std::io::Write;

use anyhow::Context;
use clap::{Args, Subcommand};
use hopper_client::{Permissions, UserInfo};
use serde::Serialize;

use crate::output::{table, write_json_line, Align};

/// `hopper user` subcommands (the admin tag is needed for all of them).
#[derive(Debug, Subcommand)]
pub enum UserCommand {
    /// Add a user, with no permissions until `hopper permissions set`.
    Add(AddArgs),
    /// Delete a user.
    Delete(NameArgs),
    /// List users with their tags and permissions.
    List(JsonArgs),
    /// Change a user's password (and, with --tags, its tags).
    Passwd(PasswdArgs),
}

/// Flags of `user add`.
#[derive(Debug, Args)]
pub struct AddArgs {
    /// The user's name.
    pub name: String,
    /// Its password; the broker keeps only a SCRAM-SHA-256 verifier of it.
    #[arg(value_name = "PASSWORD")]
    pub new_password: String,
    /// Comma-separated tags; `admin` may manage users and permissions.
    #[arg(long, value_delimiter = ',')]
    pub tags: Vec<String>,
}

/// Flags of `user passwd`.
#[derive(Debug, Args)]
pub struct PasswdArgs {
    /// The user's name.
    pub name: String,
    /// The new password.
    #[arg(value_name = "PASSWORD")]
    pub new_password: String,
    /// Replace its tags with these (comma-separated); without it the tags stay.
    #[arg(long, value_delimiter = ',')]
    pub tags: Option<Vec<String>>,
}

/// A user name.
#[derive(Debug, Args)]
pub struct NameArgs {
    /// The user's name.
    pub name: String,
}

/// `--json`.
#[derive(Debug, Args)]
pub struct JsonArgs {
    /// One JSON object per line.
    #[arg(long)]
    pub json: bool,
}

/// `hopper permissions` subcommands.
#[derive(Debug, Subcommand)]
pub enum PermissionsCommand {
    /// Set a user's three permission patterns (regular expressions matched against whole
    /// queue and exchange names; an empty one matches nothing).
    Set(SetArgs),
    /// List every user's permissions.
    List(JsonArgs),
}

/// Flags of `permissions set`.
#[derive(Debug, Args)]
pub struct SetArgs {
    /// The user whose permissions these are.
    #[arg(value_name = "USER")]
    pub name: String,
    /// Declare, delete, purge and set alarms on matching queues and exchanges.
    #[arg(long, default_value = "", value_name = "REGEX")]
    pub configure: String,
    /// Publish to matching queues and exchanges, bind to them as destination.
    #[arg(long, default_value = "", value_name = "REGEX")]
    pub write: String,
    /// Consume, get, peek and move out of matching queues; bind from matching exchanges.
    #[arg(long, default_value = "", value_name = "REGEX")]
    pub read: String,
}

/// A user as `--json` prints it.
#[derive(Debug, Serialize)]
struct UserJson<'a> {
    name: &'a str,
    tags: &'a [String],
    configure: &'a str,
    write: &'a str,
    read: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    mechanism: Option<&'a str>,
}

impl<'a> UserJson<'a> {
    fn of(user: &'a UserInfo) -> Self {
        let p = &user.permissions;
        UserJson {
            name: &user.name,
            tags: &user.tags,
            configure: &p.configure,
            write: &p.write,
            read: &p.read,
            mechanism: None,
        }
    }
}

/// Runs `hopper user ...`.
pub async fn run_user(server: &str, command: UserCommand) -> anyhow::Result<()> {
    let conn = crate::connect(server, "user").await?;
    match command {
        UserCommand::Add(args) => {
            conn.add_user(&args.name, &args.new_password, &args.tags).await?;
            eprintln!(
                "added user '{}'; give it permissions with `hopper permissions set {}`",
                args.name, args.name
            );
        }
        UserCommand::Delete(args) => {
            conn.delete_user(&args.name).await?;
            eprintln!("deleted user '{}'", args.name);
        }
        UserCommand::Passwd(args) => {
            let tags = match args.tags {
                Some(tags) => tags,
                None => current_tags(&conn, &args.name).await?,
            };
            conn.update_user(&args.name, Some(&args.new_password), &tags).await?;
            eprintln!("changed the password of user '{}'", args.name);
        }
        UserCommand::List(args) => print_users(&conn, args.json, false).await?,
    }
    Ok(())
}

/// Runs `hopper permissions ...`.
pub async fn run_permissions(server: &str, command: PermissionsCommand) -> anyhow::Result<()> {
    let conn = crate::connect(server, "permissions").await?;
    match command {
        PermissionsCommand::Set(args) => {
            let permissions = Permissions { configure: args.configure, write: args.write, read: args.read };
            conn.set_permissions(&args.name, permissions).await?;
            eprintln!("set the permissions of user '{}'", args.name);
        }
        PermissionsCommand::List(args) => print_users(&conn, args.json, true).await?,
    }
    Ok(())
}

/// Runs `hopper whoami`.
pub async fn run_whoami(server: &str, args: JsonArgs) -> anyhow::Result<()> {
    let conn = crate::connect(server, "whoami").await?;
    let (user, mechanism) = conn.whoami().await?;
    let mut out = std::io::stdout().lock();
    if args.json {
        write_json_line(&mut out, &UserJson { mechanism: Some(&mechanism), ..UserJson::of(&user) })?;
    } else {
        let p = &user.permissions;
        let lines = [
            ("user", user.name.clone()),
            ("tags", user.tags.join(",")),
            ("logged in with", mechanism),
            ("configure", p.configure.clone()),
            ("write", p.write.clone()),
            ("read", p.read.clone()),
        ];
        out.write_all(crate::output::listing(&lines).as_bytes())?;
    }
    out.flush().context("writing to stdout")
}

async fn current_tags(conn: &hopper_client::Connection, name: &str) -> anyhow::Result<Vec<String>> {
    let list = conn.list_users().await?;
    let user = list.users.into_iter().find(|u| u.name == name);
    Ok(user.with_context(|| format!("no user named '{name}'"))?.tags)
}

async fn print_users(
    conn: &hopper_client::Connection,
    json: bool,
    permissions_only: bool,
) -> anyhow::Result<()> {
    let list = conn.list_users().await?;
    let mut out = std::io::stdout().lock();
    if json {
        for user in &list.users {
            write_json_line(&mut out, &UserJson::of(user))?;
        }
    } else {
        let rows: Vec<Vec<String>> = list
            .users
            .iter()
            .map(|u| {
                let p = &u.permissions;
                let mut row = vec![u.name.clone()];
                if !permissions_only {
                    row.push(u.tags.join(","));
                }
                row.extend([p.configure.clone(), p.write.clone(), p.read.clone()]);
                row
            })
            .collect();
        let headers: &[&str] = if permissions_only {
            &["USER", "CONFIGURE", "WRITE", "READ"]
        } else {
            &["USER", "TAGS", "CONFIGURE", "WRITE", "READ"]
        };
        let align = vec![Align::Left; headers.len()];
        out.write_all(table(headers, &align, &rows).as_bytes())?;
        if list.default_user {
            eprintln!("no user is tagged admin: the built-in guest/guest works from the broker's host");
        }
    }
    out.flush().context("writing to stdout")
}

/// `hopper token` subcommands: API tokens of the user you log in as.
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a token for HTTP `Authorization: Bearer`, acting with your permissions; it is
    /// printed once.
    Create(TokenCreateArgs),
    /// List your tokens (names and times, never the tokens).
    List(JsonArgs),
    /// Delete one of your tokens; it stops working at once.
    Delete(NameArgs),
}

/// Flags of `token create`.
#[derive(Debug, Args)]
pub struct TokenCreateArgs {
    /// Its name, unique among your tokens.
    #[arg(long)]
    pub name: String,
    /// It stops working after this long (e.g. 30d, 12h); without it, it works until deleted.
    #[arg(long, value_parser = crate::time::parse_duration)]
    pub expires: Option<std::time::Duration>,
}

/// A token as `token list --json` prints it.
#[derive(Debug, Serialize)]
struct TokenJson<'a> {
    name: &'a str,
    created_ms: u64,
    expires_ms: u64,
}

/// Runs `hopper token ...`.
pub async fn run_token(server: &str, command: TokenCommand) -> anyhow::Result<()> {
    let conn = crate::connect(server, "token").await?;
    let mut out = std::io::stdout().lock();
    match command {
        TokenCommand::Create(args) => {
            let expires_ms = match args.expires {
                None => 0,
                Some(d) if d.is_zero() => {
                    anyhow::bail!("--expires must be more than zero; leave it out for no expiry")
                }
                Some(d) => {
                    crate::time::now_ms().saturating_add(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
                }
            };
            let token = conn.create_token(&args.name, expires_ms).await?;
            writeln!(out, "{token}")?;
            eprintln!("created token '{}' for user '{}'; it is shown only now", args.name, conn.user());
        }
        TokenCommand::List(args) => {
            let tokens = conn.list_tokens().await?;
            if args.json {
                for t in &tokens {
                    write_json_line(
                        &mut out,
                        &TokenJson { name: &t.name, created_ms: t.created_ms, expires_ms: t.expires_ms },
                    )?;
                }
            } else {
                let time =
                    |ms: u64| if ms == 0 { "never".to_string() } else { crate::time::format_unix_ms(ms) };
                let rows: Vec<Vec<String>> = tokens
                    .iter()
                    .map(|t| vec![t.name.clone(), time(t.created_ms), time(t.expires_ms)])
                    .collect();
                out.write_all(table(&["NAME", "CREATED", "EXPIRES"], &[Align::Left; 3], &rows).as_bytes())?;
            }
        }
        TokenCommand::Delete(args) => {
            conn.delete_token(&args.name).await?;
            eprintln!("deleted token '{}'", args.name);
        }
    }
    out.flush().context("writing to stdout")
}
