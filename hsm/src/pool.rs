//! The session pool: [`Hsm`], the handle the rest of the station holds.
//!
//! A fixed number of PKCS#11 sessions (configured) serve every caller. Blocking PKCS#11 calls
//! never stall the runtime ([`Hsm::run`]): on a multi-thread runtime they run under
//! `block_in_place` (the worker's other tasks move to another thread), elsewhere on tokio's
//! blocking threads; a semaphore keeps the number of threads inside the HSM at the pool size.
//! A call that has recently been short (by default under [`IN_PLACE_BELOW`], as short as ordinary
//! async work between two awaits) runs in place instead: the hand-off costs about a tenth of a signature.
//! Its first try only; anything that needs recovery goes the long way. Synchronous callers (the
//! CLI, a CMS builder driving [`crate::HsmSigner`]) use [`Hsm::with_session`] directly.
//!
//! Recovery: when a call fails because its session was lost, the user was logged out or the
//! library was finalised, the pool repairs what is broken (re-initialise, re-open the anchor
//! session, log in again, forget cached object handles) and retries the whole operation, a
//! bounded number of times with a growing pause. One *anchor* session stays open for the life of
//! the pool because closing a token's last session logs the user out.
//!
//! Each repair that may have invalidated handles starts a new *generation*. Token objects are
//! found again by label; session objects of a lost session are gone, and using their handles
//! gives [`Error::SessionObjectLost`] instead of touching whatever object now has that number.
//!
//! Sessions that may be invalid are never closed, only forgotten: after a re-initialisation a
//! new session can carry the number of an old one, and closing the old one would close it.
//!
//! This module does not implement operations; [`crate::session`] does.

use std::any::TypeId;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use cryptoki::context::Pkcs11;
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::object::ObjectHandle;
use cryptoki::session::{Session, SessionState, UserType};
use cryptoki::slot::Slot;
use secrecy::SecretString;
use tokio::sync::Semaphore;

use crate::config::HsmConfig;
use crate::context;
use crate::error::{CkResultExt, Error, Fault, Result};
use crate::mechanisms::Mechanisms;
use crate::session::{HsmSession, probe_mechanisms};
use crate::sync::lock;

/// Identity of the token a pool is bound to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenIdentity {
    /// CKA label of the token.
    pub label: String,
    /// Manufacturer.
    pub manufacturer: String,
    /// Model.
    pub model: String,
    /// Serial number.
    pub serial: String,
}

/// The CKF_* flags of a token that matter to a cell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TokenFlags {
    /// CKF_RNG: it has a random number generator (serials and challenges come from it).
    pub rng: bool,
    /// CKF_WRITE_PROTECTED: no object can be made.
    pub write_protected: bool,
    /// CKF_LOGIN_REQUIRED: nothing private is reachable without a log-in.
    pub login_required: bool,
    /// CKF_PROTECTED_AUTHENTICATION_PATH: PINs are entered on the device.
    pub protected_authentication_path: bool,
    /// CKF_USER_PIN_COUNT_LOW or CKF_USER_PIN_FINAL_TRY: wrong user PINs were entered.
    pub user_pin_count_low: bool,
    /// CKF_USER_PIN_TO_BE_CHANGED.
    pub user_pin_to_be_changed: bool,
    /// CKF_SO_PIN_TO_BE_CHANGED.
    pub so_pin_to_be_changed: bool,
    /// CKF_ERROR_STATE: the token failed a self-test of its own.
    pub error_state: bool,
}

/// A handle on one token through a pool of logged-in sessions. Cheap to clone.
#[derive(Clone)]
pub struct Hsm {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for Hsm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hsm")
            .field("token", &self.inner.token.label)
            .field("pool_size", &self.inner.pool_size)
            .field("generation", &self.inner.generation.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

pub(crate) struct Inner {
    ctx: Pkcs11,
    pin: SecretString,
    pool_size: usize,
    session_limit: Option<usize>,
    max_retries: u32,
    backoff: Duration,
    pub(crate) token: TokenIdentity,
    pub(crate) mechanisms: Mechanisms,
    /// See [`HsmConfig::trusted_wrap`].
    pub(crate) trusted_wrap: bool,
    /// Slot, anchor session and generation. Held while repairing, so that one thread repairs and
    /// the others wait for it.
    live: Mutex<Live>,
    /// Copy of `live.generation` for lock-free checks on every operation.
    generation: AtomicU64,
    /// Idle pool entries; `None` is a slot whose session must be opened (again).
    idle: Mutex<Vec<Option<Pooled>>>,
    returned: Condvar,
    /// Bounds the blocking threads used by the async API to the pool size.
    gate: Arc<Semaphore>,
    /// Ids of the pooled sessions known to be open (session objects are valid only while the
    /// session that created them is).
    alive: Mutex<HashSet<u64>>,
    next_id: AtomicU64,
    /// The one lock behind which objects are created, destroyed and found (SoftHSM 2.6.1 races
    /// between C_FindObjects and object creation), together with the handle cache it protects.
    pub(crate) objects: Mutex<ObjectCache>,
    /// Recent duration of each kind of [`Hsm::run`] call (by the type of its closure), in µs,
    /// as a moving average: what decides whether the next one runs in place.
    recent_us: Mutex<HashMap<TypeId, u64>>,
    in_place_below_us: u64,
    /// Async calls that ran in place (for metrics and tests).
    in_place: AtomicU64,
}

/// By default, an async call whose recent duration is below this runs in place on the calling worker:
/// tokio's guidance for work between two awaits is 10 to 100 µs, and a P-256 signature on a
/// software token takes about 70.
pub const IN_PLACE_BELOW: Duration = Duration::from_micros(150);

struct Live {
    generation: u64,
    slot: Slot,
    anchor: Option<Session>,
}

pub(crate) struct Pooled {
    session: Session,
    id: u64,
    generation: u64,
}

/// Cached handles of token objects, by (class, label). Cleared with each generation.
#[derive(Default)]
pub(crate) struct ObjectCache {
    pub(crate) handles: HashMap<(u64, String), ObjectHandle>,
}

impl Hsm {
    /// Opens the token named in `config`: loads the module (once per process), finds the token by
    /// label, reads the PIN from its source, logs in, probes mechanisms and opens the pool.
    ///
    /// This blocks (PKCS#11 calls, maybe a PIN prompt): call it before starting the runtime or
    /// inside `spawn_blocking`.
    pub fn open(config: &HsmConfig) -> Result<Hsm> {
        if config.pool_size == 0 {
            return Err(Error::InvalidInput(
                "the hsm pool size must be at least 1".into(),
            ));
        }
        let ctx = context::shared(&config.module)?;
        let pin = config.pin.read()?;
        let slot = find_slot(&ctx, &config.token_label)?;
        let info = ctx.get_token_info(slot).ck("read token information")?;
        if info.user_pin_locked() {
            return Err(Error::PinLocked {
                label: config.token_label.clone(),
            });
        }
        let token = TokenIdentity {
            label: config.token_label.clone(),
            manufacturer: info.manufacturer_id().trim().to_owned(),
            model: info.model().trim().to_owned(),
            serial: info.serial_number().trim().to_owned(),
        };
        // The pool and its anchor session stay within the token's session limits (a YubiHSM 2
        // allows 16 sessions, some network HSMs fewer per client); a larger pool is cut down.
        let session_limit = [info.max_session_count(), info.max_rw_session_count()]
            .into_iter()
            .filter_map(|l| match l {
                cryptoki::slot::Limit::Max(n) if n > 0 => usize::try_from(n).ok(),
                _ => None,
            })
            .min();
        let pool_size = pool_within(config.pool_size, session_limit);
        if pool_size < config.pool_size {
            tracing::warn!(
                token = %config.token_label,
                configured = config.pool_size,
                limit = ?session_limit,
                pool = pool_size,
                "the token allows fewer sessions than the configured pool; the pool is smaller"
            );
        }
        let anchor = ctx.open_rw_session(slot).ck("open a session")?;
        login(&anchor, &config.token_label, &pin)?;
        let objects = Mutex::new(ObjectCache::default());
        session_objects_kept(&anchor, &config.token_label)?;
        let mechanisms = probe_mechanisms(&ctx, slot, &anchor)?;
        for (name, purpose) in crate::mechanisms::REQUIRED {
            if !mechanisms.has_required(name) {
                return Err(Error::MechanismMissing {
                    mechanism: name,
                    purpose,
                });
            }
        }
        tracing::info!(
            token = %token.label,
            model = %token.model,
            pool = pool_size,
            chosen = %mechanisms.chosen(),
            "hsm opened"
        );
        let inner = Inner {
            ctx,
            pin,
            pool_size,
            session_limit,
            max_retries: config.max_retries,
            backoff: config.retry_backoff,
            token,
            mechanisms,
            live: Mutex::new(Live {
                generation: 0,
                slot,
                anchor: Some(anchor),
            }),
            generation: AtomicU64::new(0),
            idle: Mutex::new(Vec::with_capacity(pool_size)),
            returned: Condvar::new(),
            gate: Arc::new(Semaphore::new(pool_size)),
            alive: Mutex::new(HashSet::new()),
            next_id: AtomicU64::new(1),
            objects,
            recent_us: Mutex::new(HashMap::new()),
            in_place_below_us: u64::try_from(config.in_place_below.as_micros()).unwrap_or(u64::MAX),
            trusted_wrap: config.trusted_wrap,
            in_place: AtomicU64::new(0),
        };
        {
            let mut idle = lock(&inner.idle);
            for _ in 0..pool_size {
                let pooled = inner.open_pooled()?;
                idle.push(Some(pooled));
            }
        }
        Ok(Hsm {
            inner: Arc::new(inner),
        })
    }

    /// The token this pool is bound to.
    pub fn token(&self) -> &TokenIdentity {
        &self.inner.token
    }

    /// What the token offers and what was chosen (record it in what you produce).
    pub fn mechanisms(&self) -> &Mechanisms {
        &self.inner.mechanisms
    }

    /// Whether batch transport keys may be wrapped only under trusted keys
    /// ([`HsmConfig::trusted_wrap`]).
    pub fn trusted_wrap(&self) -> bool {
        self.inner.trusted_wrap
    }

    /// Number of sessions in the pool (the configured size, or less where the token allows
    /// fewer sessions).
    pub fn pool_size(&self) -> usize {
        self.inner.pool_size
    }

    /// What the token says of itself (the CKF_* flags of `C_GetTokenInfo`), read afresh.
    pub fn token_flags(&self) -> Result<TokenFlags> {
        let slot = lock(&self.inner.live).slot;
        let i = self
            .inner
            .ctx
            .get_token_info(slot)
            .ck("read token information")?;
        Ok(TokenFlags {
            rng: i.rng(),
            write_protected: i.write_protected(),
            login_required: i.login_required(),
            protected_authentication_path: i.protected_authentication_path(),
            user_pin_count_low: i.user_pin_count_low() || i.user_pin_final_try(),
            user_pin_to_be_changed: i.user_pin_to_be_changed(),
            so_pin_to_be_changed: i.so_pin_to_be_changed(),
            error_state: i.error_state(),
        })
    }

    /// The token's session limit, where it states one (`ulMaxSessionCount`,
    /// `ulMaxRwSessionCount`, the lower).
    pub fn session_limit(&self) -> Option<usize> {
        self.inner.session_limit
    }

    /// Current generation: it grows each time the pool had to re-initialise or re-open its
    /// anchor session. Useful in logs and tests.
    pub fn generation(&self) -> u64 {
        self.inner.generation.load(Ordering::Acquire)
    }

    /// How many async calls ran in place on their worker (see [`HsmConfig::in_place_below`]).
    pub fn calls_in_place(&self) -> u64 {
        self.inner.in_place.load(Ordering::Relaxed)
    }

    /// Runs `f` on a pooled session without stalling the runtime, with recovery and bounded
    /// retries. On a multi-thread runtime `f` runs on the calling worker, under `block_in_place`
    /// or, when calls of its kind (its closure type) have recently taken less than
    /// [`HsmConfig::in_place_below`], in place; either way other futures polled by the *same task* (e.g.
    /// inside one `join!`) wait for it: spawn separate tasks for concurrent HSM work.
    ///
    /// `f` may run more than once (after a lost session it is retried on a fresh one), so it must
    /// not have effects outside the HSM that cannot be repeated.
    pub async fn run<T, F>(&self, f: F) -> Result<T>
    where
        F: Fn(&HsmSession<'_>) -> Result<T> + Send + 'static,
        T: Send + 'static,
    {
        let permit = Arc::clone(&self.inner.gate)
            .acquire_owned()
            .await
            .map_err(|e| Error::Task(e.to_string()))?;
        // On a multi-thread runtime the call runs right here: `block_in_place` hands this
        // worker's other tasks to another thread, so nothing waits for a thread hand-off (two
        // cross-thread wake-ups per call cost as much as a signature on small machines).
        // Elsewhere (a current-thread runtime) it goes to the blocking pool.
        if tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread)
        {
            let _permit = permit;
            let kind = TypeId::of::<F>();
            let started = Instant::now();
            let in_place = if self.inner.recently_short(kind) {
                self.try_in_place(&f)
            } else {
                None
            };
            let result = match in_place {
                Some(r) => {
                    self.inner.in_place.fetch_add(1, Ordering::Relaxed);
                    r
                }
                None => tokio::task::block_in_place(|| self.with_session(f)),
            };
            self.inner.note_duration(kind, started.elapsed());
            return result;
        }
        let hsm = self.clone();
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            hsm.with_session(f)
        })
        .await
        .map_err(|e| Error::Task(e.to_string()))?
    }

    /// One try of `f` on an idle session, for a call expected to be short. `None` when it should
    /// go the long way instead: no idle session, or a fault that needs recovery (and its waits).
    fn try_in_place<T>(&self, f: &impl Fn(&HsmSession<'_>) -> Result<T>) -> Option<Result<T>> {
        let inner = &*self.inner;
        let mut lease = inner.try_lease()?;
        let result = match lease.ensure(inner) {
            Ok(p) => f(&HsmSession::new(self, &p.session, p.id, p.generation)),
            Err(_) => return None,
        };
        match result {
            // The long way meets the fault again and repairs what it says is broken.
            Err(e) if e.fault().is_some() => None,
            other => Some(other),
        }
    }

    /// Runs `f` on a pooled session on the calling thread (which blocks), with recovery and
    /// bounded retries. Do not call it from an async task's thread; use [`Hsm::run`] there.
    pub fn with_session<T>(&self, f: impl Fn(&HsmSession<'_>) -> Result<T>) -> Result<T> {
        let inner = &*self.inner;
        let mut attempt: u32 = 0;
        loop {
            let observed = inner.generation.load(Ordering::Acquire);
            let mut lease = inner.lease();
            let result = match lease.ensure(inner) {
                Ok(p) => f(&HsmSession::new(self, &p.session, p.id, p.generation)),
                Err(e) => Err(e),
            };
            let err = match result {
                Ok(v) => return Ok(v),
                Err(e) => e,
            };
            let Some(fault) = err.fault() else {
                return Err(err);
            };
            if fault == Fault::SessionLost || fault == Fault::LibraryLost {
                lease.discard(inner);
            }
            drop(lease);
            if attempt >= inner.max_retries || (fault == Fault::StaleHandle && attempt >= 1) {
                if fault == Fault::StaleHandle {
                    return Err(err);
                }
                return Err(Error::HsmUnavailable {
                    attempts: attempt + 1,
                    last: err.to_string(),
                });
            }
            attempt += 1;
            tracing::warn!(token = %inner.token.label, ?fault, attempt, error = %err, "hsm fault; recovering");
            if let Err(e) = inner.recover(fault, observed) {
                if matches!(e, Error::PinIncorrect { .. } | Error::PinLocked { .. }) {
                    return Err(e);
                }
                tracing::warn!(token = %inner.token.label, error = %e, "hsm recovery failed; will retry");
                std::thread::sleep(inner.backoff * attempt);
            }
        }
    }
}

impl Inner {
    pub(crate) fn current_generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    pub(crate) fn is_alive(&self, id: u64) -> bool {
        lock(&self.alive).contains(&id)
    }

    fn open_pooled(&self) -> Result<Pooled> {
        let live = lock(&self.live);
        if live.anchor.is_none() {
            return Err(Error::Pkcs11 {
                operation: "open a session".into(),
                function: "C_OpenSession".into(),
                rv: RvError::SessionHandleInvalid,
                hint: "the hsm session was lost; the operation can be retried",
            });
        }
        let session = self.ctx.open_rw_session(live.slot).ck("open a session")?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        lock(&self.alive).insert(id);
        Ok(Pooled {
            session,
            id,
            generation: live.generation,
        })
    }

    /// An idle pool entry, without waiting for one.
    fn try_lease(&self) -> Option<Lease<'_>> {
        let slot = lock(&self.idle).pop()?;
        Some(Lease { inner: self, slot })
    }

    /// Whether calls of `kind` have recently been short enough to run in place.
    fn recently_short(&self, kind: TypeId) -> bool {
        lock(&self.recent_us)
            .get(&kind)
            .is_some_and(|&us| us < self.in_place_below_us)
    }

    /// Folds one call's duration into its kind's moving average (a quarter weight: one call
    /// slowed by the scheduler does not move a kind, one that hangs in the HSM does).
    fn note_duration(&self, kind: TypeId, took: Duration) {
        let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX / 4);
        let mut recent = lock(&self.recent_us);
        let avg = recent.entry(kind).or_insert(us);
        *avg = (avg.saturating_mul(3).saturating_add(us)) / 4;
    }

    fn lease(&self) -> Lease<'_> {
        let mut idle = lock(&self.idle);
        loop {
            if let Some(slot) = idle.pop() {
                return Lease { inner: self, slot };
            }
            idle = self
                .returned
                .wait(idle)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
    }

    /// Repairs what `fault` says is broken, unless another thread already did (the generation
    /// moved on since `observed`).
    fn recover(&self, fault: Fault, observed: u64) -> Result<()> {
        let mut live = lock(&self.live);
        if live.generation != observed {
            return Ok(());
        }
        let anchor_ok = fault != Fault::LibraryLost
            && live
                .anchor
                .as_ref()
                .is_some_and(|a| anchor_healthy(a, live.slot));
        if !anchor_ok {
            return self.reset(&mut live);
        }
        match fault {
            Fault::LoginLost => {
                if let Some(anchor) = &live.anchor {
                    login(anchor, &self.token.label, &self.pin)?;
                }
                Ok(())
            }
            Fault::StaleHandle => {
                lock(&self.objects).handles.clear();
                Ok(())
            }
            // One session was lost and already retired by its lease; the rest is fine.
            Fault::SessionLost | Fault::LibraryLost => Ok(()),
        }
    }

    /// Starts a new generation: forgets every session and handle, (re-)initialises the library,
    /// finds the token again by label, opens a new anchor and logs in.
    fn reset(&self, live: &mut Live) -> Result<()> {
        tracing::warn!(token = %self.token.label, generation = live.generation + 1, "re-initialising the hsm connection");
        if let Some(anchor) = live.anchor.take() {
            std::mem::forget(anchor);
        }
        lock(&self.alive).clear();
        lock(&self.objects).handles.clear();
        live.generation += 1;
        self.generation.store(live.generation, Ordering::Release);
        context::initialize(&self.ctx)?;
        let slot = match find_slot(&self.ctx, &self.token.label) {
            Ok(slot) => slot,
            Err(Error::TokenNotFound { .. }) => {
                // A library lists its tokens when it is initialised: start it again so that a
                // token that came back (re-plugged, network restored) is seen.
                let _ = self.ctx.clone().finalize();
                context::initialize(&self.ctx)?;
                find_slot(&self.ctx, &self.token.label)?
            }
            Err(e) => return Err(e),
        };
        let anchor = self.ctx.open_rw_session(slot).ck("open a session")?;
        login(&anchor, &self.token.label, &self.pin)?;
        live.slot = slot;
        live.anchor = Some(anchor);
        Ok(())
    }
}

/// One checked-out pool entry; goes back to the pool when dropped.
struct Lease<'a> {
    inner: &'a Inner,
    slot: Option<Pooled>,
}

impl Lease<'_> {
    /// The leased session, opened anew if the entry is empty or from an older generation.
    fn ensure(&mut self, inner: &Inner) -> Result<&Pooled> {
        let current = inner.current_generation();
        let usable = self
            .slot
            .as_ref()
            .is_some_and(|p| p.generation == current && inner.is_alive(p.id));
        if !usable {
            self.discard(inner);
            self.slot = Some(inner.open_pooled()?);
        }
        // Just filled above when it was empty.
        self.slot
            .as_ref()
            .ok_or_else(|| Error::Task("empty pool entry".into()))
    }

    /// Forgets the leased session (it is or may be invalid).
    fn discard(&mut self, inner: &Inner) {
        if let Some(p) = self.slot.take() {
            lock(&inner.alive).remove(&p.id);
            std::mem::forget(p.session);
        }
    }
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        let mut idle = lock(&self.inner.idle);
        idle.push(self.slot.take());
        self.inner.returned.notify_one();
    }
}

/// The cell makes every meter's keys, and its key-transport keys, as session objects, so that
/// none outlives its meter (even when the station dies). A token without session objects
/// (YubiHSM 2 keeps every key) is refused here, by name, before anything is made on it.
fn session_objects_kept(session: &Session, label: &str) -> Result<()> {
    use cryptoki::mechanism::Mechanism;
    let made = session.generate_key(&Mechanism::AesKeyGen, &crate::session::throwaway_aes(false));
    match made {
        Ok(h) => {
            let _ = session.destroy_object(h);
            Ok(())
        }
        Err(CkError::Pkcs11(
            rv @ (RvError::TemplateInconsistent
            | RvError::TemplateIncomplete
            | RvError::AttributeValueInvalid
            | RvError::AttributeTypeInvalid),
            _,
        )) => Err(Error::TokenUnfit {
            label: label.to_owned(),
            reason: format!(
                "it keeps no session objects (C_GenerateKey with CKA_TOKEN false returned {}); the cell makes each meter's keys as session objects so that none outlives its meter — use a token that allows them",
                crate::error::ckr_name(rv)
            ),
        }),
        // No AES key generation at all: the required-mechanism check says so, by name.
        Err(CkError::Pkcs11(RvError::MechanismInvalid, _)) => Ok(()),
        Err(e) => Err(Error::ck("generate a session key", e)),
    }
}

/// The pool size for `configured` sessions under a token's session `limit`: the pool and its
/// anchor session fit, and there is at least one pooled session.
fn pool_within(configured: usize, limit: Option<usize>) -> usize {
    match limit {
        Some(limit) if configured + 1 > limit => limit.saturating_sub(1).max(1),
        _ => configured,
    }
}

/// Finds the slot whose token carries `label` (never by slot number: modules renumber).
pub(crate) fn find_slot(ctx: &Pkcs11, label: &str) -> Result<Slot> {
    let slots = ctx.get_slots_with_token().ck("list slots")?;
    let mut seen = Vec::new();
    for slot in slots {
        let info = match ctx.get_token_info(slot) {
            Ok(info) => info,
            Err(e) => {
                // Reported, never skipped: it may be the token asked for.
                let why = match e {
                    CkError::Pkcs11(rv, _) => crate::error::ckr_name(rv),
                    other => other.to_string(),
                };
                tracing::warn!(slot = %slot, error = %why, "a slot's token information cannot be read");
                seen.push(format!(
                    "<slot {slot}: token information unreadable, {why}>"
                ));
                continue;
            }
        };
        let l = info.label().trim_end();
        if l == label {
            return Ok(slot);
        }
        if info.token_initialized() {
            seen.push(l.to_owned());
        }
    }
    Err(Error::TokenNotFound {
        label: label.to_owned(),
        available: seen,
    })
}

/// Logs the user in on `session`; an existing login of this process is fine.
pub(crate) fn login(session: &Session, label: &str, pin: &SecretString) -> Result<()> {
    login_outcome(session.login(UserType::User, Some(pin)), label)
}

/// Maps the outcome of `C_Login` to this crate's errors.
fn login_outcome(r: std::result::Result<(), CkError>, label: &str) -> Result<()> {
    match r {
        Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(()),
        Err(CkError::Pkcs11(RvError::PinIncorrect, _)) => Err(Error::PinIncorrect {
            label: label.to_owned(),
        }),
        Err(CkError::Pkcs11(RvError::PinLocked, _)) => Err(Error::PinLocked {
            label: label.to_owned(),
        }),
        Err(e) => Err(Error::ck("log in", e)),
    }
}

fn anchor_healthy(anchor: &Session, slot: Slot) -> bool {
    match anchor.get_session_info() {
        Ok(info) => info.slot_id() == slot && info.session_state() == SessionState::RwUser,
        Err(_) => false,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use cryptoki::context::Function;

    /// A token of 16 sessions (YubiHSM 2) gets a pool of 15 and the anchor, whatever was
    /// configured; tokens that state no limit get the configured pool.
    #[test]
    fn the_pool_stays_within_the_tokens_session_limit() {
        assert_eq!(pool_within(64, Some(16)), 15);
        assert_eq!(pool_within(15, Some(16)), 15);
        assert_eq!(pool_within(8, Some(16)), 8);
        assert_eq!(pool_within(4, Some(1)), 1);
        assert_eq!(pool_within(64, None), 64);
    }

    /// SoftHSM 2.6.1 never locks its user PIN (it only raises CKF_USER_PIN_COUNT_LOW), so the
    /// locked case cannot be provoked against it; the mapping is checked here instead.
    #[test]
    fn login_outcomes_map_to_distinct_errors() {
        let rv = |rv| Err(CkError::Pkcs11(rv, Function::Login));
        assert!(login_outcome(Ok(()), "t").is_ok());
        assert!(login_outcome(rv(RvError::UserAlreadyLoggedIn), "t").is_ok());
        let e = login_outcome(rv(RvError::PinIncorrect), "t").unwrap_err();
        assert!(matches!(e, Error::PinIncorrect { .. }), "{e}");
        let e = login_outcome(rv(RvError::PinLocked), "t").unwrap_err();
        assert!(matches!(e, Error::PinLocked { .. }), "{e}");
        assert_eq!(
            e.to_string(),
            "the user pin of token \"t\" is locked after too many failures; the security officer must unlock or reset it"
        );
        let e = login_outcome(rv(RvError::DeviceError), "t").unwrap_err();
        assert!(
            matches!(
                e,
                Error::Pkcs11 {
                    rv: RvError::DeviceError,
                    ..
                }
            ),
            "{e}"
        );
    }
}
