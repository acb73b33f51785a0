//! Work on every core: the engine prepares received and loaded documents in parallel.

/// Maps `f` over `items` on `threads` threads and returns the results in order, or `None` if a
/// thread panicked. Work is taken in small slices from a shared counter, so that a thread that
/// drew heavy items (Contracts) does not leave the others idle.
pub fn par_map<T: Sync, R: Send>(
    items: &[T],
    threads: usize,
    f: impl Fn(&T) -> R + Sync,
) -> Option<Vec<R>> {
    const SLICE: usize = 16;
    let threads = threads.clamp(1, 16).min(items.len().div_ceil(SLICE).max(1));
    if threads == 1 {
        return Some(items.iter().map(f).collect());
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    let mut slices: Vec<(usize, Vec<R>)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                let (next, f) = (&next, &f);
                scope.spawn(move || {
                    let mut done = Vec::new();
                    loop {
                        let start = next.fetch_add(SLICE, std::sync::atomic::Ordering::Relaxed);
                        if start >= items.len() {
                            break done;
                        }
                        let end = (start + SLICE).min(items.len());
                        done.push((start, items[start..end].iter().map(f).collect()));
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_default())
            .collect()
    });
    slices.sort_by_key(|(start, _)| *start);
    let out: Vec<R> = slices.into_iter().flat_map(|(_, r)| r).collect();
    (out.len() == items.len()).then_some(out)
}
