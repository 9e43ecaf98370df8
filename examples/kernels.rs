//! One-thread microbenchmark of the matvec kernels on a random m x n matrix
//! (10 % salient, 8-bit residual): the kernel alone, no Python, no pool.
//!
//! `cargo build --release --example kernels`, then
//! `MODE=int8|f32|rowwise|quantize PBCODEC_SIMD=scalar|avx2|avx512 ./target/release/examples/kernels M N BATCH`.
//! Prints the median time and weights per cycle at a nominal 2.6 GHz (x batch).
use std::time::Instant;

use pbcodec::pb::{compress, Params};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let m: usize = args.get(1).map(|s| s.parse().unwrap()).unwrap_or(4096);
    let n: usize = args.get(2).map(|s| s.parse().unwrap()).unwrap_or(4096);
    let batch: usize = args.get(3).map(|s| s.parse().unwrap()).unwrap_or(1);
    let mut s = 1u64;
    let mut r = || {
        s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
    };
    let w: Vec<f32> = (0..m * n).map(|_| r()).collect();
    let p = Params::default(); // 10 % salient, 8-bit
    let t = compress(&w, m, n, None, &p).unwrap();
    let l = pbcodec::layout::build(&t.view()).unwrap();
    let x: Vec<f32> = (0..n * batch).map(|_| r()).collect();
    let mut y = vec![0f32; m * batch];
    pbcodec::parallel::set_num_threads(1).unwrap();
    let mode = std::env::var("MODE").unwrap_or_else(|_| "int8".into());
    let reps = (2e9 as usize / (m * n * batch)).max(3);
    let mut ts = vec![];
    for _ in 0..reps {
        let t0 = Instant::now();
        if mode == "int8" {
            pbcodec::qmatvec::matvec_int8(&l, &x, batch, None, &mut y).unwrap();
        } else if mode == "quantize" {
            std::hint::black_box(pbcodec::qmatvec::quantize(&x, batch, n, &l));
        } else if mode == "f32" {
            pbcodec::fmatvec::matvec_f32(&l, &x, batch, None, &mut y).unwrap();
        } else {
            pbcodec::matvec::matvec(&t.view(), &x, batch, &mut y).unwrap();
        }
        ts.push(t0.elapsed().as_secs_f64());
    }
    ts.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let med = ts[ts.len() / 2];
    println!(
        "{mode} {m}x{n} b{batch} {:?}: {:.1} us, {:.2} w/cycle@2.6GHz (x batch)",
        pbcodec::simd::level(),
        med * 1e6,
        (m * n * batch) as f64 / med / 2.6e9
    );
}
