//! The worker pool for multi-threaded kernels. Default size: `PBCODEC_NUM_THREADS`
//! or all cores; `set_num_threads` rebuilds it. Kernels split work so that
//! every output element is computed by one thread in a fixed order, which
//! makes results identical for any thread count.
use std::sync::{Arc, RwLock};

use rayon::ThreadPool;

static POOL: RwLock<Option<Arc<ThreadPool>>> = RwLock::new(None);

fn default_threads() -> usize {
    std::env::var("PBCODEC_NUM_THREADS")
        .ok()
        .and_then(|s| s.trim().parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1))
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

pub fn set_num_threads(n: usize) -> crate::Result<()> {
    if n == 0 {
        return crate::error::invalid("number of threads must be at least 1");
    }
    let p = build(n)?;
    *POOL.write().unwrap_or_else(|e| e.into_inner()) = Some(p);
    Ok(())
}

pub fn num_threads() -> usize {
    pool().current_num_threads()
}
