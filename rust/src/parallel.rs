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

fn build(n: usize) -> Arc<ThreadPool> {
    Arc::new(
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .thread_name(|i| format!("pbcodec-{i}"))
            .build()
            .expect("failed to start pbcodec worker threads"),
    )
}

pub fn pool() -> Arc<ThreadPool> {
    if let Some(p) = POOL.read().unwrap().as_ref() {
        return p.clone();
    }
    let mut w = POOL.write().unwrap();
    w.get_or_insert_with(|| build(default_threads())).clone()
}

pub fn set_num_threads(n: usize) -> crate::Result<()> {
    if n == 0 {
        return crate::error::invalid("number of threads must be at least 1");
    }
    *POOL.write().unwrap() = Some(build(n));
    Ok(())
}

pub fn num_threads() -> usize {
    pool().current_num_threads()
}
