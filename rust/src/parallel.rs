//! The worker pool for multi-threaded kernels. Default size: `PBCODEC_NUM_THREADS`
//! or all cores; `set_num_threads` rebuilds it. Both go through one check
//! ([`check_threads`]: an integer in 1..=[`MAX_THREADS`]); an invalid variable is
//! ignored (all cores are used) and reported by [`env_threads`], which the
//! Python package turns into a warning at import. Kernels split work so that
//! every output element is computed by one thread in a fixed order, which
//! makes results identical for any thread count.
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use rayon::ThreadPool;

static POOL: RwLock<Option<(u32, Arc<ThreadPool>)>> = RwLock::new(None);

/// Most worker threads a pool may have (starting thousands of threads takes
/// minutes and only slows the kernels down).
pub const MAX_THREADS: usize = 1024;

/// The one validity check for a thread count (`set_num_threads` and `PBCODEC_NUM_THREADS`).
pub fn check_threads(n: usize) -> crate::Result<usize> {
    if !(1..=MAX_THREADS).contains(&n) {
        return crate::error::invalid(format!("number of threads must be an int in 1..{MAX_THREADS}, got {n}"));
    }
    Ok(n)
}

/// `PBCODEC_NUM_THREADS`, validated: `Ok(None)` when unset or empty, `Err` with the
/// reason when it is not an integer in 1..=[`MAX_THREADS`].
pub fn env_threads() -> crate::Result<Option<usize>> {
    let Some(s) = env_value("PBCODEC_NUM_THREADS")? else {
        return Ok(None);
    };
    match s.trim().parse::<usize>().map_err(|_| ()).and_then(|n| check_threads(n).map_err(|_| ())) {
        Ok(n) => Ok(Some(n)),
        Err(()) => crate::error::invalid(format!(
            "PBCODEC_NUM_THREADS={s:?} is ignored: it must be an int in 1..{MAX_THREADS}; using all cores"
        )),
    }
}

/// An environment variable's value: `Ok(None)` when unset or blank, `Err` when
/// it is not valid Unicode.
fn env_value(name: &str) -> crate::Result<Option<String>> {
    match std::env::var(name) {
        Ok(s) if !s.trim().is_empty() => Ok(Some(s)),
        Ok(_) | Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(_)) => {
            crate::error::invalid(format!("{name} is not valid Unicode; it is ignored"))
        }
    }
}

fn default_threads() -> usize {
    match env_threads() {
        Ok(Some(n)) => n,
        _ => std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).min(MAX_THREADS),
    }
}

fn build(n: usize) -> crate::Result<Arc<ThreadPool>> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .thread_name(|i| format!("pbcodec-{i}"))
        .build()
        .map(Arc::new)
        .map_err(|e| crate::Error::Invalid(format!("cannot start {n} worker threads: {e}")))
}

/// The pool; built on first use, and again in a forked child (a pool is stamped
/// with its process id: `fork()` copies the pool's state but none of its threads,
/// so a job handed to it there would wait forever). If the configured size cannot
/// be started (e.g. an absurd PBCODEC_NUM_THREADS) it falls back to one thread.
pub fn pool() -> Arc<ThreadPool> {
    let pid = std::process::id();
    if let Some((p_pid, p)) = POOL.read().unwrap_or_else(|e| e.into_inner()).as_ref() {
        if *p_pid == pid {
            return p.clone();
        }
    }
    // Build outside the lock; if two threads race, the first stored wins.
    let p = build(default_threads()).or_else(|_| build(1)).expect("cannot start even one worker thread");
    let mut w = POOL.write().unwrap_or_else(|e| e.into_inner());
    match w.take() {
        Some((q_pid, q)) if q_pid == pid => {
            *w = Some((q_pid, q.clone()));
            q
        }
        old => {
            std::mem::forget(old); // a parent's pool: its threads do not exist here
            *w = Some((pid, p.clone()));
            p
        }
    }
}

/// Replace the pool with one of `n` threads (checked by [`check_threads`]).
pub fn set_num_threads(n: usize) -> crate::Result<()> {
    let p = build(check_threads(n)?)?;
    let pid = std::process::id();
    {
        let mut w = POOL.write().unwrap_or_else(|e| e.into_inner());
        if let Some((q_pid, q)) = w.take() {
            if q_pid != pid {
                std::mem::forget(q); // a parent's pool (see `pool`); else dropped, its threads exit
            }
        }
        *w = Some((pid, p));
    }
    let old = TEAM.lock().unwrap_or_else(|e| e.into_inner()).take(); // rebuilt at the new size
    forget_if_foreign(old);
    Ok(())
}

// ------------------------------------------------------------------ the team

/// How long an idle team worker keeps polling for the next job before it
/// sleeps. Waking a sleeping thread costs 25-50 µs on these VMs (an empty
/// 2-thread rayon `install` measured 17 µs back to back and 47-64 µs after a
/// pause), as much as a whole in-cache GEMV; layers called one after another
/// find the worker still awake. `PBCODEC_SPIN_US` overrides it (0: sleep at once).
pub const SPIN_US_DEFAULT: u64 = 200;

/// Longest accepted `PBCODEC_SPIN_US` (1 s): beyond it an idle worker would
/// hold a core for no gain.
pub const MAX_SPIN_US: u64 = 1_000_000;

/// `PBCODEC_SPIN_US`, validated: `Ok(None)` when unset or empty, `Err` with the
/// reason when it is not an integer in 0..=[`MAX_SPIN_US`] (then the default is
/// used; the Python package warns at import, as for `PBCODEC_NUM_THREADS`).
pub fn env_spin_us() -> crate::Result<Option<u64>> {
    let Some(s) = env_value("PBCODEC_SPIN_US")? else {
        return Ok(None);
    };
    match s.trim().parse::<u64>() {
        Ok(v) if v <= MAX_SPIN_US => Ok(Some(v)),
        _ => crate::error::invalid(format!(
            "PBCODEC_SPIN_US={s:?} is ignored: it must be an int in 0..{MAX_SPIN_US} (microseconds); \
             using {SPIN_US_DEFAULT}"
        )),
    }
}

static TEAM: std::sync::Mutex<Option<(u32, Arc<TeamHandle>)>> = std::sync::Mutex::new(None);

/// One parallel call: chunk indices handed out by `next`, run by `f`.
struct Job {
    /// Lifetime-erased `&(dyn Fn(usize) + Sync)`: valid while the job is published
    /// (see [`Team::run`], which unpublishes it and waits for every worker first).
    f: *const (dyn Fn(usize) + Sync + 'static),
    n: usize,
    next: AtomicUsize,
    panicked: AtomicBool,
}

/// The calling thread plus `threads - 1` workers for short kernels (the layout
/// GEMVs): the caller takes chunks too and waits by spinning, and idle workers
/// poll for [`SPIN_US_DEFAULT`] before parking, so a call costs ~1 µs of
/// coordination instead of two or three thread wake-ups.
struct Team {
    /// The published job, or null.
    slot: AtomicPtr<Job>,
    /// Bumped at each publication, so workers see a new job.
    epoch: AtomicU64,
    /// Workers between "about to read `slot`" and "done with its job".
    users: AtomicUsize,
    /// Workers parked or about to park.
    sleeping: AtomicUsize,
    shutdown: AtomicBool,
    /// One call at a time; a concurrent (or nested) call runs on its own thread.
    busy: std::sync::Mutex<()>,
    /// The workers, to unpark them (set once they are started).
    workers: std::sync::OnceLock<Vec<std::thread::Thread>>,
    spin: Duration,
}

/// The owner of a team: dropping the last handle (a resize, or exit) stops its
/// workers, which hold the `Team` itself.
struct TeamHandle(Arc<Team>);

impl Drop for TeamHandle {
    fn drop(&mut self) {
        self.0.shutdown.store(true, Ordering::SeqCst);
        self.0.unpark_all();
    }
}

// SAFETY: `Job::f` is only dereferenced while its `run` call keeps the closure
// alive (the protocol in `Team::run`); the closure itself is Sync.
unsafe impl Send for Job {}
// SAFETY: as above.
unsafe impl Sync for Job {}

impl Team {
    /// A team of the caller and `threads - 1` workers (fewer if threads cannot be started).
    fn start(threads: usize) -> TeamHandle {
        let spin = env_spin_us().ok().flatten();
        let team = Arc::new(Team {
            slot: AtomicPtr::new(std::ptr::null_mut()),
            epoch: AtomicU64::new(0),
            users: AtomicUsize::new(0),
            sleeping: AtomicUsize::new(0),
            shutdown: AtomicBool::new(false),
            busy: std::sync::Mutex::new(()),
            workers: std::sync::OnceLock::new(),
            spin: Duration::from_micros(spin.unwrap_or(SPIN_US_DEFAULT)),
        });
        let mut handles = Vec::new();
        for i in 1..threads {
            let t = team.clone();
            match std::thread::Builder::new().name(format!("pbcodec-team-{i}")).spawn(move || t.work()) {
                Ok(h) => handles.push(h.thread().clone()),
                Err(_) => break, // fewer workers: the caller takes the remaining chunks
            }
        }
        let _ = team.workers.set(handles);
        TeamHandle(team)
    }

    fn unpark_all(&self) {
        self.workers.get().into_iter().flatten().for_each(|w| w.unpark());
    }

    /// A worker's life: poll, help with each new job, park after `spin` idle.
    fn work(&self) {
        let mut seen = self.epoch.load(Ordering::SeqCst);
        let mut idle_since = Instant::now();
        let mut polls = 0u32;
        while !self.shutdown.load(Ordering::Acquire) {
            let e = self.epoch.load(Ordering::SeqCst);
            if e != seen {
                seen = e;
                self.help();
                idle_since = Instant::now();
                continue;
            }
            polls = polls.wrapping_add(1);
            // (No sched_yield here: with it, two-thread in-cache calls measured 1.35x
            // slower on these VMs.)
            if !polls.is_multiple_of(64) || idle_since.elapsed() < self.spin {
                std::hint::spin_loop();
                continue;
            }
            // Announce, re-check, park: a publisher either sees `sleeping` and
            // unparks, or this thread sees its new epoch (both SeqCst).
            self.sleeping.fetch_add(1, Ordering::SeqCst);
            if self.epoch.load(Ordering::SeqCst) == seen && !self.shutdown.load(Ordering::SeqCst) {
                std::thread::park();
            }
            self.sleeping.fetch_sub(1, Ordering::SeqCst);
            idle_since = Instant::now();
        }
    }

    /// Take chunks of the published job, if there still is one.
    fn help(&self) {
        self.users.fetch_add(1, Ordering::SeqCst);
        let p = self.slot.load(Ordering::SeqCst);
        if !p.is_null() {
            // SAFETY: a non-null slot read after incrementing `users` stays valid
            // until this thread decrements `users` (`run` unpublishes, then waits
            // for users == 0 before its job and closure go away).
            let job = unsafe { &*p };
            loop {
                let i = job.next.fetch_add(1, Ordering::Relaxed);
                if i >= job.n {
                    break;
                }
                // SAFETY: as above, the closure outlives this call.
                let f = unsafe { &*job.f };
                if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(i))).is_err() {
                    job.panicked.store(true, Ordering::SeqCst);
                }
            }
        }
        self.users.fetch_sub(1, Ordering::SeqCst);
    }

    /// `f(i)` for every `i < n`, on the caller and the workers; returns when all are done.
    fn run(&self, n: usize, f: &(dyn Fn(usize) + Sync)) {
        // Another call holding the team: run alone. (A panic in an earlier call
        // poisoned the lock; the team's state is consistent after every call.)
        let _busy = match self.busy.try_lock() {
            Ok(g) => g,
            Err(std::sync::TryLockError::Poisoned(e)) => e.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return (0..n).for_each(f),
        };
        // SAFETY: only the lifetime is erased; the pointer is unpublished and every
        // worker is done with it (Unpublish below) before `f` can go away.
        let f_static: &(dyn Fn(usize) + Sync + 'static) = unsafe { std::mem::transmute(f) };
        let job = Job { f: f_static, n, next: AtomicUsize::new(0), panicked: AtomicBool::new(false) };
        /// Unpublish the job and wait for the workers, also when `f` panics here.
        struct Unpublish<'a>(&'a Team);
        impl Drop for Unpublish<'_> {
            fn drop(&mut self) {
                self.0.slot.store(std::ptr::null_mut(), Ordering::SeqCst);
                let mut spins = 0u32;
                while self.0.users.load(Ordering::SeqCst) != 0 {
                    // A worker still runs its last chunk; if it was descheduled (more
                    // threads than cores), give it this core rather than spin a slice.
                    spins += 1;
                    if spins.is_multiple_of(256) {
                        std::thread::yield_now();
                    } else {
                        std::hint::spin_loop();
                    }
                }
            }
        }
        self.slot.store(&job as *const Job as *mut Job, Ordering::SeqCst);
        let guard = Unpublish(self);
        self.epoch.fetch_add(1, Ordering::SeqCst);
        if self.sleeping.load(Ordering::SeqCst) > 0 {
            self.unpark_all();
        }
        loop {
            let i = job.next.fetch_add(1, Ordering::Relaxed);
            if i >= n {
                break;
            }
            f(i);
        }
        drop(guard);
        if job.panicked.load(Ordering::SeqCst) {
            panic!("a pbcodec worker thread panicked");
        }
    }
}

/// The team of this process: built on first use (threads started outside the
/// lock), and again in a forked child, like [`pool`].
fn team() -> Arc<TeamHandle> {
    let pid = std::process::id();
    if let Some((t_pid, t)) = TEAM.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
        if *t_pid == pid {
            return t.clone();
        }
    }
    let fresh = Arc::new(Team::start(num_threads()));
    let mut g = TEAM.lock().unwrap_or_else(|e| e.into_inner());
    match g.take() {
        Some((t_pid, t)) if t_pid == pid => {
            *g = Some((t_pid, t.clone()));
            t // another thread was first; `fresh` is dropped and its workers exit
        }
        old => {
            forget_if_foreign(old);
            *g = Some((pid, fresh.clone()));
            fresh
        }
    }
}

/// Drop a team of this process (its workers exit); forget one copied from a
/// parent by `fork()` (its workers do not exist here).
fn forget_if_foreign(old: Option<(u32, Arc<TeamHandle>)>) {
    if let Some((pid, t)) = old {
        if pid != std::process::id() {
            std::mem::forget(t);
        }
    }
}

/// Split `data` into chunks of `chunk` elements (the last may be shorter) and run
/// `f(index, chunk)` for each on the calling thread and the team's workers (see
/// [`SPIN_US_DEFAULT`]): for short kernels, where a rayon call's thread wake-ups
/// would cost as much as the work. Which thread runs which chunk varies; a
/// kernel whose chunks write disjoint outputs gives the same result anyway.
pub fn team_chunks_mut<T: Send>(data: &mut [T], chunk: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    let chunk = chunk.max(1);
    let len = data.len();
    let n = len.div_ceil(chunk);
    let base = SendPtr(data.as_mut_ptr());
    let g = move |i: usize| {
        let start = i * chunk;
        let end = (start + chunk).min(len);
        // SAFETY: i < n, so [start, end) lies in `data`, and each index is handed out
        // once, so the chunks are disjoint; `data` is borrowed mutably for this call.
        let s = unsafe { std::slice::from_raw_parts_mut(base.get().add(start), end - start) };
        f(i, s)
    };
    if n <= 1 || num_threads() == 1 {
        return (0..n).for_each(g);
    }
    team().0.run(n, &g);
}

/// A raw pointer that may cross threads (the chunks it is split into are disjoint).
struct SendPtr<T>(*mut T);
impl<T> Clone for SendPtr<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for SendPtr<T> {}
impl<T> SendPtr<T> {
    fn get(self) -> *mut T {
        self.0
    }
}
// SAFETY: used only by `team_chunks_mut`, whose chunks are disjoint and `T: Send`.
unsafe impl<T: Send> Send for SendPtr<T> {}
// SAFETY: as above.
unsafe impl<T: Send> Sync for SendPtr<T> {}

/// Threads of the pool (building it on first use).
pub fn num_threads() -> usize {
    pool().current_num_threads()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `run` over a private team: every index exactly once, whatever the threads.
    fn run_counts(team: &Team, n: usize) -> Vec<usize> {
        let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
        team.run(n, &|i| {
            hits[i].fetch_add(1, Ordering::Relaxed);
        });
        hits.iter().map(|h| h.load(Ordering::Relaxed)).collect()
    }

    #[test]
    fn team_runs_every_chunk_once() {
        for threads in [1, 2, 3, 5] {
            let h = Team::start(threads);
            for n in [0, 1, 2, 7, 64, 1000] {
                for _ in 0..20 {
                    assert_eq!(run_counts(&h.0, n), vec![1; n], "threads {threads} n {n}");
                }
            }
            // after the workers have gone to sleep
            std::thread::sleep(Duration::from_millis(2));
            assert_eq!(run_counts(&h.0, 100), vec![1; 100]);
        }
    }

    #[test]
    fn team_concurrent_and_nested_calls_and_panics() {
        let h = Arc::new(Team::start(3));
        // Several callers at once: one holds the team, the others run alone.
        std::thread::scope(|s| {
            for _ in 0..4 {
                let h = h.clone();
                s.spawn(move || {
                    for _ in 0..50 {
                        assert_eq!(run_counts(&h.0, 37), vec![1; 37]);
                    }
                });
            }
        });
        // A nested call runs on the calling thread.
        let outer: Vec<AtomicUsize> = (0..8).map(|_| AtomicUsize::new(0)).collect();
        h.0.run(8, &|i| {
            assert_eq!(run_counts(&h.0, 5), vec![1; 5]);
            outer[i].fetch_add(1, Ordering::Relaxed);
        });
        assert!(outer.iter().all(|c| c.load(Ordering::Relaxed) == 1));
        // A panic in any chunk reaches the caller, and the team keeps working.
        for bad in [0, 13, 63] {
            let r = std::panic::catch_unwind(|| h.0.run(64, &|i| assert!(i != bad, "chunk {i}")));
            assert!(r.is_err());
            assert_eq!(run_counts(&h.0, 64), vec![1; 64]);
        }
        // ... and still shares the work (not just the caller alone).
        let shared = (0..20).any(|_| {
            let ids = std::sync::Mutex::new(std::collections::HashSet::new());
            h.0.run(16, &|_| {
                ids.lock().unwrap().insert(std::thread::current().id());
                std::thread::sleep(Duration::from_micros(300));
            });
            ids.into_inner().unwrap().len() > 1
        });
        assert!(shared, "no worker took a chunk");
    }

    #[test]
    fn team_chunks_cover_the_slice() {
        let mut v = vec![0u32; 1001];
        team_chunks_mut(&mut v, 10, |c, s| {
            for (k, x) in s.iter_mut().enumerate() {
                *x += (c * 10 + k) as u32 + 1;
            }
        });
        assert!(v.iter().enumerate().all(|(i, &x)| x == i as u32 + 1));
    }

    #[test]
    fn one_check_for_every_source() {
        assert!(check_threads(0).is_err());
        assert!(check_threads(MAX_THREADS + 1).is_err());
        assert_eq!(check_threads(MAX_THREADS).unwrap(), MAX_THREADS);
        assert!(set_num_threads(20000).is_err());
        assert!(set_num_threads(0).is_err());
    }
}
