//! Users, roles, PINs, sessions and the one permission table every command goes through.
//!
//! PINs are hashed with Argon2id (PHC strings with their own salt) and compared in constant time
//! by the hasher. After `max_failed_pins` wrong PINs a user is locked out for `lockout_minutes`.
//! Sessions are random tokens of which only the SHA-256 is stored; they end after
//! `session_idle_minutes` without activity. This module decides; the engine audits.

use argon2::password_hash::phc::PasswordHash;
use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use argon2::{Algorithm, Argon2, Params, Version};
use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::config::AccessSettings;
use crate::db::DbError;

/// A role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Runs the line.
    Operator,
    /// Opens and closes batches, acknowledges alarms, decides rework.
    Supervisor,
    /// HSM, PKI, users, customers, firmware, exports.
    SecurityOfficer,
    /// Reads and verifies the audit log.
    Auditor,
}

impl Role {
    /// Name as stored and typed.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Operator => "operator",
            Role::Supervisor => "supervisor",
            Role::SecurityOfficer => "security_officer",
            Role::Auditor => "auditor",
        }
    }

    /// Parses a role name.
    pub fn parse(s: &str) -> Option<Role> {
        Some(match s {
            "operator" => Role::Operator,
            "supervisor" => Role::Supervisor,
            "security_officer" | "security-officer" => Role::SecurityOfficer,
            "auditor" => Role::Auditor,
            _ => return None,
        })
    }

    /// Every role.
    pub const ALL: [Role; 4] = [
        Role::Operator,
        Role::Supervisor,
        Role::SecurityOfficer,
        Role::Auditor,
    ];
}

/// Everything a user can ask of the station.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// See the line, batches and nests.
    ViewLine,
    /// Start and stop the line or a nest.
    RunLine,
    /// Clear a failed nest so it takes the next meter.
    ClearNest,
    /// Open a batch.
    OpenBatch,
    /// Close a batch.
    CloseBatch,
    /// Allow a meter to be provisioned again.
    Rework,
    /// Acknowledge an alarm.
    AckAlarm,
    /// Import a firmware release.
    ImportFirmware,
    /// Import a customer (utility) certificate.
    ImportCustomer,
    /// Add, disable users, reset PINs.
    ManageUsers,
    /// Export a batch manifest.
    ExportManifest,
    /// Set up or change the PKI in the HSM.
    ManagePki,
    /// See HSM information.
    ViewHsm,
    /// Read the audit log.
    ViewAudit,
    /// Verify the audit log.
    VerifyAudit,
    /// Export the audit log.
    ExportAudit,
}

impl Action {
    /// What the action is, in words.
    pub fn describe(self) -> &'static str {
        match self {
            Action::ViewLine => "view the line",
            Action::RunLine => "start or stop the line",
            Action::ClearNest => "clear a nest",
            Action::OpenBatch => "open a batch",
            Action::CloseBatch => "close a batch",
            Action::Rework => "approve a rework",
            Action::AckAlarm => "acknowledge alarms",
            Action::ImportFirmware => "import firmware",
            Action::ImportCustomer => "import customers",
            Action::ManageUsers => "manage users",
            Action::ExportManifest => "export manifests",
            Action::ManagePki => "change the PKI",
            Action::ViewHsm => "view the HSM",
            Action::ViewAudit => "read the audit log",
            Action::VerifyAudit => "verify the audit log",
            Action::ExportAudit => "export the audit log",
        }
    }
}

/// The permission table: who may do what. The single place this is decided.
pub const PERMISSIONS: &[(Action, &[Role])] = &[
    (
        Action::ViewLine,
        &[
            Role::Operator,
            Role::Supervisor,
            Role::SecurityOfficer,
            Role::Auditor,
        ],
    ),
    (Action::RunLine, &[Role::Operator, Role::Supervisor]),
    (Action::ClearNest, &[Role::Operator, Role::Supervisor]),
    (Action::OpenBatch, &[Role::Supervisor]),
    (Action::CloseBatch, &[Role::Supervisor]),
    (Action::Rework, &[Role::Supervisor]),
    (Action::AckAlarm, &[Role::Supervisor]),
    (Action::ImportFirmware, &[Role::SecurityOfficer]),
    (Action::ImportCustomer, &[Role::SecurityOfficer]),
    (Action::ManageUsers, &[Role::SecurityOfficer]),
    (Action::ExportManifest, &[Role::SecurityOfficer]),
    (Action::ManagePki, &[Role::SecurityOfficer]),
    (Action::ViewHsm, &[Role::SecurityOfficer, Role::Auditor]),
    (
        Action::ViewAudit,
        &[Role::Supervisor, Role::SecurityOfficer, Role::Auditor],
    ),
    (Action::VerifyAudit, &[Role::SecurityOfficer, Role::Auditor]),
    (Action::ExportAudit, &[Role::Auditor, Role::SecurityOfficer]),
];

/// May `role` perform `action`?
pub fn allowed(role: Role, action: Action) -> bool {
    PERMISSIONS
        .iter()
        .any(|(a, roles)| *a == action && roles.contains(&role))
}

/// An authenticated user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct User {
    /// Row id.
    pub id: i64,
    /// Name.
    pub name: String,
    /// Role.
    pub role: Role,
    /// Disabled users cannot log in.
    pub disabled: bool,
    /// Locked until (Unix ms), if locked.
    pub locked_until: Option<i64>,
}

/// Why authentication or authorisation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    /// Unknown user or wrong PIN (one message for both, so names cannot be probed).
    #[error("wrong user name or PIN{}", remaining.map(|r| format!(" ({r} attempts left before lock-out)")).unwrap_or_default())]
    BadCredentials {
        /// Attempts left, when the user exists.
        remaining: Option<u32>,
        /// The user, when known (for the audit log, never shown).
        #[doc(hidden)]
        user: Option<String>,
    },
    /// Locked out.
    #[error(
        "user {user} is locked out for {minutes} more minute(s) after too many wrong PINs; ask a security officer or wait"
    )]
    Locked {
        /// The user.
        user: String,
        /// Minutes left.
        minutes: u64,
    },
    /// Disabled.
    #[error("user {0} is disabled; ask a security officer")]
    Disabled(String),
    /// Session ended for inactivity (or unknown).
    #[error("the session expired after inactivity; log in again")]
    Expired,
    /// Not allowed.
    #[error("{user} ({}) may not {}; this needs one of: {}", role.as_str(), action.describe(), who_may(*action))]
    Forbidden {
        /// Who tried.
        user: String,
        /// Their role.
        role: Role,
        /// What.
        action: Action,
    },
    /// A PIN that does not meet the policy.
    #[error("PINs must be {0} to 64 digits")]
    WeakPin(usize),
    /// A user name that cannot be used.
    #[error("user names are 1 to 32 letters, digits, '.', '-' or '_'")]
    BadName,
    /// No such user (for management commands).
    #[error("no user named {0}")]
    NoSuchUser(String),
    /// The journal failed.
    #[error("{0}")]
    Db(String),
}

/// Roles allowed `action`, for messages.
pub fn who_may(action: Action) -> String {
    PERMISSIONS
        .iter()
        .find(|(a, _)| *a == action)
        .map(|(_, roles)| {
            roles
                .iter()
                .map(|r| r.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default()
}

impl From<rusqlite::Error> for AuthError {
    fn from(e: rusqlite::Error) -> Self {
        AuthError::Db(DbError::from(e).to_string())
    }
}

fn hasher() -> Argon2<'static> {
    // OWASP's recommended Argon2id parameters: 19 MiB, 2 passes, 1 lane.
    let params = Params::new(19 * 1024, 2, 1, None).unwrap_or_default();
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
}

/// Checks a PIN against the policy.
pub fn check_pin_policy(pin: &str, min: usize) -> Result<(), AuthError> {
    if pin.len() < min || pin.len() > 64 || !pin.chars().all(|c| c.is_ascii_digit()) {
        return Err(AuthError::WeakPin(min));
    }
    Ok(())
}

/// Argon2id hash of a PIN, as a PHC string.
pub fn hash_pin(pin: &str) -> Result<String, AuthError> {
    let hash: PasswordHash = hasher()
        .hash_password(pin.as_bytes())
        .map_err(|e| AuthError::Db(format!("cannot hash the PIN: {e}")))?;
    Ok(hash.to_string())
}

fn pin_matches(pin: &str, phc: &str) -> bool {
    PasswordHash::new(phc)
        .map(|h| hasher().verify_password(pin.as_bytes(), &h).is_ok())
        .unwrap_or(false)
}

fn check_name(name: &str) -> Result<(), AuthError> {
    if name.is_empty()
        || name.len() > 32
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || ".-_".contains(c))
    {
        return Err(AuthError::BadName);
    }
    Ok(())
}

fn user_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<User> {
    let role: String = r.get(2)?;
    Ok(User {
        id: r.get(0)?,
        name: r.get(1)?,
        role: Role::parse(&role).unwrap_or(Role::Operator),
        disabled: r.get::<_, i64>(3)? != 0,
        locked_until: r.get(4)?,
    })
}

/// Adds a user.
pub fn add_user(
    conn: &Connection,
    name: &str,
    role: Role,
    pin: &str,
    access: &AccessSettings,
    now: i64,
) -> Result<User, AuthError> {
    check_name(name)?;
    check_pin_policy(pin, access.min_pin_length)?;
    let hash = hash_pin(pin)?;
    conn.execute(
        "INSERT INTO users (name, role, pin_hash, created_at) VALUES (?1, ?2, ?3, ?4)",
        params![name, role.as_str(), hash, now],
    )
    .map_err(|e| match DbError::from(e) {
        DbError::Constraint(_) => AuthError::Db(format!("a user named {name} already exists")),
        other => AuthError::Db(other.to_string()),
    })?;
    find_user(conn, name)?.ok_or_else(|| AuthError::NoSuchUser(name.into()))
}

/// Looks a user up.
pub fn find_user(conn: &Connection, name: &str) -> Result<Option<User>, AuthError> {
    Ok(conn
        .query_row(
            "SELECT id, name, role, disabled, locked_until FROM users WHERE name = ?1",
            [name],
            user_from_row,
        )
        .optional()?)
}

/// Every user.
pub fn list_users(conn: &Connection) -> Result<Vec<User>, AuthError> {
    let mut stmt =
        conn.prepare("SELECT id, name, role, disabled, locked_until FROM users ORDER BY name")?;
    let rows = stmt.query_map([], user_from_row)?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Disables a user and ends their sessions.
pub fn disable_user(conn: &Connection, name: &str, now: i64) -> Result<(), AuthError> {
    let n = conn.execute("UPDATE users SET disabled = 1 WHERE name = ?1", [name])?;
    if n == 0 {
        return Err(AuthError::NoSuchUser(name.into()));
    }
    conn.execute(
        "UPDATE sessions SET ended_at = ?1 WHERE ended_at IS NULL AND user_id = (SELECT id FROM users WHERE name = ?2)",
        params![now, name],
    )?;
    Ok(())
}

/// Sets a new PIN and clears a lock-out.
pub fn reset_pin(
    conn: &Connection,
    name: &str,
    pin: &str,
    access: &AccessSettings,
) -> Result<(), AuthError> {
    check_pin_policy(pin, access.min_pin_length)?;
    let hash = hash_pin(pin)?;
    let n = conn.execute(
        "UPDATE users SET pin_hash = ?1, failed_pins = 0, locked_until = NULL WHERE name = ?2",
        params![hash, name],
    )?;
    if n == 0 {
        return Err(AuthError::NoSuchUser(name.into()));
    }
    Ok(())
}

/// What a login attempt did, for the audit log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoginOutcome {
    /// Logged in.
    Success(User),
    /// Refused; `locked_now` when this attempt caused the lock-out.
    Refused {
        /// Why.
        error: AuthError,
        /// This attempt locked the user out.
        locked_now: bool,
    },
}

/// Checks a user's PIN, counting failures and locking out.
pub fn login(
    conn: &Connection,
    name: &str,
    pin: &str,
    access: &AccessSettings,
    now: i64,
) -> Result<LoginOutcome, AuthError> {
    let row: Option<(User, String, u32)> = conn
        .query_row(
            "SELECT id, name, role, disabled, locked_until, pin_hash, failed_pins FROM users WHERE name = ?1",
            [name],
            |r| Ok((user_from_row(r)?, r.get(5)?, r.get(6)?)),
        )
        .optional()?;
    let Some((user, hash, failed)) = row else {
        // Spend the same time as a real check, so that names cannot be told apart by timing.
        let _ = pin_matches(
            pin,
            "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHRzb21lc2FsdA$Jd9tK4hoZb0yq8dJcr7PCqvq0ZJ8+TqH0ZBc7i0PP1I",
        );
        return Ok(LoginOutcome::Refused {
            error: AuthError::BadCredentials {
                remaining: None,
                user: None,
            },
            locked_now: false,
        });
    };
    if user.disabled {
        return Ok(LoginOutcome::Refused {
            error: AuthError::Disabled(user.name),
            locked_now: false,
        });
    }
    if let Some(until) = user.locked_until.filter(|u| *u > now) {
        return Ok(LoginOutcome::Refused {
            error: AuthError::Locked {
                user: user.name,
                minutes: ((until - now) as u64).div_ceil(60_000),
            },
            locked_now: false,
        });
    }
    if pin_matches(pin, &hash) {
        conn.execute(
            "UPDATE users SET failed_pins = 0, locked_until = NULL WHERE id = ?1",
            [user.id],
        )?;
        return Ok(LoginOutcome::Success(User {
            locked_until: None,
            ..user
        }));
    }
    // A lock-out that has run out starts a fresh count.
    let failed = if user.locked_until.is_some() {
        1
    } else {
        failed + 1
    };
    if failed >= access.max_failed_pins {
        let until = now + (access.lockout_minutes as i64) * 60_000;
        conn.execute(
            "UPDATE users SET failed_pins = ?1, locked_until = ?2 WHERE id = ?3",
            params![failed, until, user.id],
        )?;
        Ok(LoginOutcome::Refused {
            error: AuthError::Locked {
                user: user.name,
                minutes: access.lockout_minutes,
            },
            locked_now: true,
        })
    } else {
        conn.execute(
            "UPDATE users SET failed_pins = ?1, locked_until = NULL WHERE id = ?2",
            params![failed, user.id],
        )?;
        Ok(LoginOutcome::Refused {
            error: AuthError::BadCredentials {
                remaining: Some(access.max_failed_pins - failed),
                user: Some(user.name),
            },
            locked_now: false,
        })
    }
}

/// A session token as handed to a front end. Only its hash is stored.
#[derive(Clone, PartialEq, Eq)]
pub struct SessionToken(Zeroizing<String>);

impl std::fmt::Debug for SessionToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionToken(<redacted>)")
    }
}

impl SessionToken {
    fn hash(&self) -> Vec<u8> {
        Sha256::digest(self.0.as_bytes()).to_vec()
    }
}

/// Starts a session for `user`.
pub fn start_session(conn: &Connection, user: &User, now: i64) -> Result<SessionToken, AuthError> {
    let mut raw = [0u8; 32];
    rand_core::Rng::fill_bytes(&mut line_protocol::io::system_rng(), &mut raw);
    let token = SessionToken(Zeroizing::new(hex::encode(raw)));
    conn.execute(
        "INSERT INTO sessions (token_hash, user_id, created_at, last_seen) VALUES (?1, ?2, ?3, ?3)",
        params![token.hash(), user.id, now],
    )?;
    Ok(token)
}

/// Resolves a session, refreshing its activity time; ends it when idle too long.
pub fn check_session(
    conn: &Connection,
    token: &SessionToken,
    access: &AccessSettings,
    now: i64,
) -> Result<User, AuthError> {
    let row: Option<(User, i64)> = conn
        .query_row(
            "SELECT u.id, u.name, u.role, u.disabled, u.locked_until, s.last_seen FROM sessions s JOIN users u ON u.id = s.user_id
             WHERE s.token_hash = ?1 AND s.ended_at IS NULL",
            [token.hash()],
            |r| Ok((user_from_row(r)?, r.get(5)?)),
        )
        .optional()?;
    let Some((user, last_seen)) = row else {
        return Err(AuthError::Expired);
    };
    if user.disabled {
        return Err(AuthError::Disabled(user.name));
    }
    if now - last_seen > (access.session_idle_minutes as i64) * 60_000 {
        conn.execute(
            "UPDATE sessions SET ended_at = ?1 WHERE token_hash = ?2",
            params![now, token.hash()],
        )?;
        return Err(AuthError::Expired);
    }
    conn.execute(
        "UPDATE sessions SET last_seen = ?1 WHERE token_hash = ?2",
        params![now, token.hash()],
    )?;
    Ok(user)
}

/// Ends a session.
pub fn end_session(conn: &Connection, token: &SessionToken, now: i64) -> Result<(), AuthError> {
    conn.execute(
        "UPDATE sessions SET ended_at = ?1 WHERE token_hash = ?2 AND ended_at IS NULL",
        params![now, token.hash()],
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn access() -> AccessSettings {
        AccessSettings {
            max_failed_pins: 3,
            lockout_minutes: 10,
            session_idle_minutes: 15,
            min_pin_length: 6,
        }
    }

    #[test]
    fn lockout_expiry_and_sessions() {
        let dir = tempfile::tempdir().unwrap();
        let db = crate::db::Db::open(&dir.path().join("u.db")).unwrap();
        db.with(|c| {
            let a = access();
            add_user(c, "ann", Role::Operator, "123456", &a, 0).unwrap();
            assert!(matches!(
                add_user(c, "bob", Role::Operator, "12", &a, 0),
                Err(AuthError::WeakPin(6))
            ));
            assert!(matches!(
                add_user(c, "b b", Role::Operator, "123456", &a, 0),
                Err(AuthError::BadName)
            ));
            assert!(matches!(
                login(c, "ann", "123456", &a, 1).unwrap(),
                LoginOutcome::Success(_)
            ));
            assert!(matches!(
                login(c, "nobody", "123456", &a, 1).unwrap(),
                LoginOutcome::Refused {
                    error: AuthError::BadCredentials {
                        remaining: None,
                        ..
                    },
                    ..
                }
            ));
            assert!(matches!(
                login(c, "ann", "000000", &a, 2).unwrap(),
                LoginOutcome::Refused {
                    error: AuthError::BadCredentials {
                        remaining: Some(2),
                        ..
                    },
                    ..
                }
            ));
            login(c, "ann", "000000", &a, 3).unwrap();
            assert!(matches!(
                login(c, "ann", "000000", &a, 4).unwrap(),
                LoginOutcome::Refused {
                    error: AuthError::Locked { .. },
                    locked_now: true
                }
            ));
            // Even the right PIN is refused while locked; it works again after the lock-out.
            assert!(matches!(
                login(c, "ann", "123456", &a, 5).unwrap(),
                LoginOutcome::Refused {
                    error: AuthError::Locked { .. },
                    locked_now: false
                }
            ));
            let later = 4 + 10 * 60_000 + 1;
            let LoginOutcome::Success(user) = login(c, "ann", "123456", &a, later).unwrap() else {
                panic!()
            };
            let t = start_session(c, &user, later).unwrap();
            assert_eq!(
                check_session(c, &t, &a, later + 60_000).unwrap().name,
                "ann"
            );
            assert_eq!(
                check_session(c, &t, &a, later + 60_000 + 16 * 60_000),
                Err(AuthError::Expired)
            );
            assert_eq!(
                check_session(c, &t, &a, later + 60_000 + 16 * 60_000 + 1),
                Err(AuthError::Expired),
                "stays ended"
            );
            disable_user(c, "ann", later).unwrap();
            assert!(matches!(
                login(c, "ann", "123456", &a, later + 5).unwrap(),
                LoginOutcome::Refused {
                    error: AuthError::Disabled(_),
                    ..
                }
            ));
        });
    }

    #[test]
    fn permission_table_covers_every_action_once() {
        let actions = [
            Action::ViewLine,
            Action::RunLine,
            Action::ClearNest,
            Action::OpenBatch,
            Action::CloseBatch,
            Action::Rework,
            Action::AckAlarm,
            Action::ImportFirmware,
            Action::ImportCustomer,
            Action::ManageUsers,
            Action::ExportManifest,
            Action::ManagePki,
            Action::ViewHsm,
            Action::ViewAudit,
            Action::VerifyAudit,
            Action::ExportAudit,
        ];
        for a in actions {
            assert_eq!(
                PERMISSIONS.iter().filter(|(x, _)| *x == a).count(),
                1,
                "{a:?}"
            );
        }
        assert!(allowed(Role::Supervisor, Action::AckAlarm));
        assert!(!allowed(Role::Operator, Action::AckAlarm));
        assert!(!allowed(Role::Auditor, Action::RunLine));
    }
}
