//! Thread pools: `threads = None` uses rayon's global pool (all cores);
//! `Some(n)` a cached pool of `n` threads. Output never depends on the count.

use crate::error::{Error, Result};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

static POOLS: OnceLock<Mutex<HashMap<usize, Arc<rayon::ThreadPool>>>> = OnceLock::new();

/// Runs `f` inside the pool for `threads`.
pub fn run_with<R: Send>(threads: Option<usize>, f: impl FnOnce() -> R + Send) -> Result<R> {
    let Some(n) = threads else {
        return Ok(f());
    };
    if n == 0 || n > 1024 {
        return Err(Error::Invalid(format!(
            "threads must be between 1 and 1024 (or None for all cores), got {n}"
        )));
    }
    let pool = {
        let mut pools = POOLS
            .get_or_init(|| Mutex::new(HashMap::new()))
            .lock()
            .expect("pool lock");
        match pools.get(&n) {
            Some(p) => p.clone(),
            None => {
                let p = Arc::new(
                    rayon::ThreadPoolBuilder::new()
                        .num_threads(n)
                        .thread_name(|i| format!("ckpt-{i}"))
                        .build()
                        .map_err(|e| Error::Invalid(format!("cannot start threads: {e}")))?,
                );
                pools.insert(n, p.clone());
                p
            }
        }
    };
    Ok(pool.install(f))
}
