//! Users, roles, PINs, sessions and the one permission table every command goes through.
//!
//! PINs are peppered, then hashed: the HSM computes HMAC-SHA256 over the PIN with a key that
//! never leaves the token ([`PepperedPin`]), and only that MAC is hashed with Argon2id (PHC
//! strings with their own salt) and compared, in constant time, by the hasher. A copy of the
//! journal therefore yields no PIN: without the token not even the right PIN can be checked
//! against it. An unknown user, a wrong PIN, a disabled user and a locked-out user with a wrong
//! PIN all get the same answer after the same work; only the right PIN learns that its user is
//! locked out or disabled. After `max_failed_pins` wrong PINs a user is locked out for
//! `lockout_minutes`.
//!
//! Sessions are random tokens of which only the SHA-256 is stored; they end after
//! `session_idle_minutes` without activity, after `session_max_hours` in all, when the user's
//! PIN is reset and when the user is disabled. This module decides; the engine audits.

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
    /// Resume a frozen audit log.
    RecoverAudit,
    /// See the factory's production across cells (the registry).
    ViewFleet,
    /// See the shift's dashboards (yield per nest and step, failure reasons, cycle time).
    ViewShift,
    /// Print a meter's rating-plate label again.
    ReprintLabel,
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
            Action::RecoverAudit => "resume a frozen audit log",
            Action::ViewFleet => "view the factory's production",
            Action::ViewShift => "view the shift's dashboards",
            Action::ReprintLabel => "reprint a label",
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
    (Action::RecoverAudit, &[Role::SecurityOfficer]),
    (
        Action::ViewFleet,
        &[Role::Supervisor, Role::SecurityOfficer, Role::Auditor],
    ),
    (
        Action::ViewShift,
        &[Role::Supervisor, Role::SecurityOfficer, Role::Auditor],
    ),
    (Action::ReprintLabel, &[Role::Supervisor]),
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
    /// Unknown user or wrong PIN (one message for both, so names cannot be probed: the attempts
    /// left are for the audit log, never shown).
    #[error("wrong user name or PIN")]
    BadCredentials {
        /// Attempts left, when the user exists (audit log only).
        #[doc(hidden)]
        remaining: Option<u32>,
        /// The user, when known (audit log only).
        #[doc(hidden)]
        user: Option<String>,
        /// This attempt locked the user out (audit log only).
        #[doc(hidden)]
        locked_now: bool,
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
    /// Session ended (inactivity, its lifetime, a PIN reset, log-out) or unknown.
    #[error("the session has ended; log in again")]
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

/// What is mixed into the HSM's MAC before the PIN, so that the pepper key's MACs of PINs can
/// never be mistaken for MACs of anything else.
pub const PEPPER_CONTEXT: &[u8] = b"station pin v1\0";

/// A PIN after the HSM's pepper: HMAC-SHA256(pepper key, [`PEPPER_CONTEXT`] ‖ PIN), computed in
/// the token. The only form in which a PIN is ever hashed or compared.
pub struct PepperedPin(Zeroizing<[u8; 32]>);

impl PepperedPin {
    /// From the MAC the token computed.
    pub fn from_mac(mac: [u8; 32]) -> PepperedPin {
        PepperedPin(Zeroizing::new(mac))
    }

    /// The input the token's MAC is computed over.
    pub fn mac_input(pin: &str) -> Zeroizing<Vec<u8>> {
        let mut v = Zeroizing::new(Vec::with_capacity(PEPPER_CONTEXT.len() + pin.len()));
        v.extend_from_slice(PEPPER_CONTEXT);
        v.extend_from_slice(pin.as_bytes());
        v
    }
}

impl std::fmt::Debug for PepperedPin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PepperedPin(<redacted>)")
    }
}

/// Argon2id hash of a peppered PIN, as a PHC string.
pub fn hash_pin(pin: &PepperedPin) -> Result<String, AuthError> {
    let hash: PasswordHash = hasher()
        .hash_password(pin.0.as_slice())
        .map_err(|e| AuthError::Db(format!("cannot hash the PIN: {e}")))?;
    Ok(hash.to_string())
}

/// Whether `pin` matches the PHC string `phc` (constant time in the hasher).
pub fn pin_matches(pin: &PepperedPin, phc: &str) -> bool {
    PasswordHash::new(phc)
        .map(|h| hasher().verify_password(pin.0.as_slice(), &h).is_ok())
        .unwrap_or(false)
}

/// A PHC string of the same cost as a real one, checked for unknown users so that they take as
/// long as known ones (its input is unknowable: it matches nothing).
const DECOY_HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHRzb21lc2FsdA$Jd9tK4hoZb0yq8dJcr7PCqvq0ZJ8+TqH0ZBc7i0PP1I";

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
/// Checks a new user's name (before anything is asked of the HSM).
pub fn check_user_name(name: &str) -> Result<(), AuthError> {
    check_name(name)
}

/// Adds a user. The PIN's policy was checked before it was peppered
/// ([`check_pin_policy`]).
pub fn add_user(
    conn: &Connection,
    name: &str,
    role: Role,
    pin: &PepperedPin,
    now: i64,
) -> Result<User, AuthError> {
    check_name(name)?;
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

/// Sets a new PIN (its policy checked before it was peppered), clears a lock-out and ends the
/// user's sessions: whoever knew the old PIN is logged out.
pub fn reset_pin(
    conn: &Connection,
    name: &str,
    pin: &PepperedPin,
    now: i64,
) -> Result<(), AuthError> {
    let hash = hash_pin(pin)?;
    let n = conn.execute(
        "UPDATE users SET pin_hash = ?1, failed_pins = 0, locked_until = NULL WHERE name = ?2",
        params![hash, name],
    )?;
    if n == 0 {
        return Err(AuthError::NoSuchUser(name.into()));
    }
    conn.execute(
        "UPDATE sessions SET ended_at = ?1 WHERE ended_at IS NULL AND user_id = (SELECT id FROM users WHERE name = ?2)",
        params![now, name],
    )?;
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

fn bad_credentials(remaining: Option<u32>, user: Option<String>, locked_now: bool) -> AuthError {
    AuthError::BadCredentials {
        remaining,
        user,
        locked_now,
    }
}

/// Checks a user's PIN, counting failures and locking out. Every attempt does the same work
/// (one Argon2id check, a decoy one for unknown users) and every wrong PIN gets the same
/// answer, whether the user exists, is disabled or is locked out; the audit log is told more.
pub fn login(
    conn: &Connection,
    name: &str,
    pin: &PepperedPin,
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
        let _ = pin_matches(pin, DECOY_HASH);
        return Ok(LoginOutcome::Refused {
            error: bad_credentials(None, None, false),
            locked_now: false,
        });
    };
    let matches = pin_matches(pin, &hash);
    if user.disabled {
        return Ok(LoginOutcome::Refused {
            error: if matches {
                AuthError::Disabled(user.name)
            } else {
                bad_credentials(None, Some(user.name), false)
            },
            locked_now: false,
        });
    }
    if let Some(until) = user.locked_until.filter(|u| *u > now) {
        return Ok(LoginOutcome::Refused {
            error: if matches {
                AuthError::Locked {
                    user: user.name,
                    minutes: ((until - now) as u64).div_ceil(60_000),
                }
            } else {
                bad_credentials(Some(0), Some(user.name), false)
            },
            locked_now: false,
        });
    }
    if matches {
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
            error: bad_credentials(Some(0), Some(user.name), true),
            locked_now: true,
        })
    } else {
        conn.execute(
            "UPDATE users SET failed_pins = ?1, locked_until = NULL WHERE id = ?2",
            params![failed, user.id],
        )?;
        Ok(LoginOutcome::Refused {
            error: bad_credentials(
                Some(access.max_failed_pins - failed),
                Some(user.name),
                false,
            ),
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

    /// A token as a client sent it back.
    pub fn from_client(token: &str) -> SessionToken {
        SessionToken(Zeroizing::new(token.to_string()))
    }

    /// The token, to hand to the client that logged in (never logged).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

/// Only write a session's activity time when it is older than this: a busy client's every call
/// does not cost the journal a synchronous commit.
const LAST_SEEN_RESOLUTION_MS: i64 = 5_000;

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

/// Resolves a session, refreshing its activity time; ends it when idle too long or older than
/// its lifetime.
pub fn check_session(
    conn: &Connection,
    token: &SessionToken,
    access: &AccessSettings,
    now: i64,
) -> Result<User, AuthError> {
    let (user, last_seen) = live_session(conn, token, access, now)?;
    if now - last_seen > (access.session_idle_minutes as i64) * 60_000 {
        end_session(conn, token, now)?;
        return Err(AuthError::Expired);
    }
    if now - last_seen >= LAST_SEEN_RESOLUTION_MS {
        conn.execute(
            "UPDATE sessions SET last_seen = ?1 WHERE token_hash = ?2",
            params![now, token.hash()],
        )?;
    }
    Ok(user)
}

/// Whether a session may still follow the line (an event stream): not ended, its user not
/// disabled, within its lifetime. Watching is not activity: nothing is written, and the idle
/// limit applies to commands only.
pub fn session_alive(
    conn: &Connection,
    token: &SessionToken,
    access: &AccessSettings,
    now: i64,
) -> Result<User, AuthError> {
    live_session(conn, token, access, now).map(|(u, _)| u)
}

fn live_session(
    conn: &Connection,
    token: &SessionToken,
    access: &AccessSettings,
    now: i64,
) -> Result<(User, i64), AuthError> {
    let row: Option<(User, i64, i64)> = conn
        .query_row(
            "SELECT u.id, u.name, u.role, u.disabled, u.locked_until, s.last_seen, s.created_at FROM sessions s JOIN users u ON u.id = s.user_id
             WHERE s.token_hash = ?1 AND s.ended_at IS NULL",
            [token.hash()],
            |r| Ok((user_from_row(r)?, r.get(5)?, r.get(6)?)),
        )
        .optional()?;
    let Some((user, last_seen, created)) = row else {
        return Err(AuthError::Expired);
    };
    if user.disabled {
        return Err(AuthError::Expired);
    }
    if now - created > (access.session_max_hours as i64) * 3_600_000 {
        return Err(AuthError::Expired);
    }
    Ok((user, last_seen))
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
            session_max_hours: 12,
            min_pin_length: 6,
        }
    }

    /// A stand-in for the token's MAC (these tests are about the journal's side).
    fn pep(pin: &str) -> PepperedPin {
        PepperedPin::from_mac(Sha256::digest(PepperedPin::mac_input(pin).as_slice()).into())
    }

    fn refused_as_bad_credentials(o: LoginOutcome) -> AuthError {
        match o {
            LoginOutcome::Refused { error, .. } => {
                assert_eq!(error.to_string(), "wrong user name or PIN");
                error
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn lockout_expiry_and_sessions() {
        let dir = tempfile::tempdir().unwrap();
        let db = crate::db::Db::open(&dir.path().join("u.db")).unwrap();
        db.with(|c| {
            let a = access();
            add_user(c, "ann", Role::Operator, &pep("123456"), 0).unwrap();
            assert!(matches!(
                check_pin_policy("12", 6),
                Err(AuthError::WeakPin(6))
            ));
            assert!(matches!(
                add_user(c, "b b", Role::Operator, &pep("123456"), 0),
                Err(AuthError::BadName)
            ));
            assert!(matches!(
                login(c, "ann", &pep("123456"), &a, 1).unwrap(),
                LoginOutcome::Success(_)
            ));
            // An unknown user and a wrong PIN read the same.
            refused_as_bad_credentials(login(c, "nobody", &pep("123456"), &a, 1).unwrap());
            let e = refused_as_bad_credentials(login(c, "ann", &pep("000000"), &a, 2).unwrap());
            assert!(matches!(
                e,
                AuthError::BadCredentials {
                    remaining: Some(2),
                    ..
                }
            ));
            login(c, "ann", &pep("000000"), &a, 3).unwrap();
            // The attempt that locks the user out says nothing more either (the audit log knows).
            let o = login(c, "ann", &pep("000000"), &a, 4).unwrap();
            assert!(matches!(
                o,
                LoginOutcome::Refused {
                    locked_now: true,
                    ..
                }
            ));
            refused_as_bad_credentials(o);
            // While locked: a wrong PIN reads as any wrong PIN; the right one learns of the lock.
            refused_as_bad_credentials(login(c, "ann", &pep("000000"), &a, 5).unwrap());
            assert!(matches!(
                login(c, "ann", &pep("123456"), &a, 5).unwrap(),
                LoginOutcome::Refused {
                    error: AuthError::Locked { .. },
                    locked_now: false
                }
            ));
            let later = 4 + 10 * 60_000 + 1;
            let LoginOutcome::Success(user) = login(c, "ann", &pep("123456"), &a, later).unwrap()
            else {
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
            refused_as_bad_credentials(login(c, "ann", &pep("000000"), &a, later + 5).unwrap());
            assert!(matches!(
                login(c, "ann", &pep("123456"), &a, later + 5).unwrap(),
                LoginOutcome::Refused {
                    error: AuthError::Disabled(_),
                    ..
                }
            ));
        });
    }

    #[test]
    fn sessions_end_at_their_lifetime_and_when_the_pin_is_reset() {
        let dir = tempfile::tempdir().unwrap();
        let db = crate::db::Db::open(&dir.path().join("u.db")).unwrap();
        db.with(|c| {
            let a = access();
            let user = add_user(c, "bea", Role::Supervisor, &pep("123456"), 0).unwrap();
            // Busy all the time, yet over its lifetime: ended.
            let t = start_session(c, &user, 0).unwrap();
            let hour = 3_600_000;
            let mut now = 0;
            while now < 12 * hour {
                now += 10 * 60_000;
                assert!(check_session(c, &t, &a, now).is_ok(), "at {now} ms");
            }
            assert_eq!(
                check_session(c, &t, &a, 12 * hour + 60_000),
                Err(AuthError::Expired)
            );
            // A PIN reset ends every session of the user, also for following the line.
            let t1 = start_session(c, &user, 0).unwrap();
            let t2 = start_session(c, &user, 0).unwrap();
            assert!(session_alive(c, &t2, &a, 1).is_ok());
            reset_pin(c, "bea", &pep("654321"), 2).unwrap();
            assert_eq!(check_session(c, &t1, &a, 3), Err(AuthError::Expired));
            assert_eq!(session_alive(c, &t2, &a, 3), Err(AuthError::Expired));
            assert!(matches!(
                login(c, "bea", &pep("654321"), &a, 4).unwrap(),
                LoginOutcome::Success(_)
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
            Action::RecoverAudit,
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
