//! The worker pool for multi-threaded kernels. Default size: `PBCODEC_NUM_THREADS`
//! or all cores; `set_num_threads` rebuilds it. Both go through one check
//! ([`check_threads`]: an integer in 1..=[`MAX_THREADS`]); an invalid variable is
//! ignored (all cores are used) and reported by [`env_threads`], which the
//! Python package turns into a warning at import. Kernels split work so that
//! every output element is computed by one thread in a fixed order, which
//! makes results identical for any thread count.
use std::sync::{Arc, RwLock};

use rayon::ThreadPool;

static POOL: RwLock<Option<Arc<ThreadPool>>> = RwLock::new(None);

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
    let s = match std::env::var("PBCODEC_NUM_THREADS") {
        Ok(s) if !s.trim().is_empty() => s,
        Ok(_) | Err(std::env::VarError::NotPresent) => return Ok(None),
        Err(std::env::VarError::NotUnicode(_)) => {
            return crate::error::invalid("PBCODEC_NUM_THREADS is not valid Unicode; it is ignored")
        }
    };
    match s.trim().parse::<usize>().map_err(|_| ()).and_then(|n| check_threads(n).map_err(|_| ())) {
        Ok(n) => Ok(Some(n)),
        Err(()) => crate::error::invalid(format!(
            "PBCODEC_NUM_THREADS={s:?} is ignored: it must be an int in 1..{MAX_THREADS}; using all cores"
        )),
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

/// The pool; built on first use. If the configured size cannot be started
/// (e.g. an absurd PBCODEC_NUM_THREADS) it falls back to one thread.
pub fn pool() -> Arc<ThreadPool> {
    if let Some(p) = POOL.read().unwrap_or_else(|e| e.into_inner()).as_ref() {
        return p.clone();
    }
    // Build outside the lock; if two threads race, the first stored wins.
    let p = build(default_threads()).or_else(|_| build(1)).expect("cannot start even one worker thread");
    let mut w = POOL.write().unwrap_or_else(|e| e.into_inner());
    w.get_or_insert(p).clone()
}

/// Replace the pool with one of `n` threads (checked by [`check_threads`]).
pub fn set_num_threads(n: usize) -> crate::Result<()> {
    let p = build(check_threads(n)?)?;
    *POOL.write().unwrap_or_else(|e| e.into_inner()) = Some(p);
    Ok(())
}

/// Threads of the pool (building it on first use).
pub fn num_threads() -> usize {
    pool().current_num_threads()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_check_for_every_source() {
        assert!(check_threads(0).is_err());
        assert!(check_threads(MAX_THREADS + 1).is_err());
        assert_eq!(check_threads(MAX_THREADS).unwrap(), MAX_THREADS);
        assert!(set_num_threads(20000).is_err());
        assert!(set_num_threads(0).is_err());
    }
}
