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

/// Maps `f` over `items` cut into one contiguous chunk per thread (for work that pays by being
/// done many items at once, as signatures checked in batches), and returns the results in order,
/// or `None` if a thread panicked or `f` did not return one result per item.
pub fn par_chunks<T: Sync, R: Send>(
    items: &[T],
    threads: usize,
    f: impl Fn(&[T]) -> Vec<R> + Sync,
) -> Option<Vec<R>> {
    const MIN: usize = 32;
    let threads = threads.clamp(1, 16).min(items.len().div_ceil(MIN).max(1));
    if threads == 1 {
        let out = f(items);
        return (out.len() == items.len()).then_some(out);
    }
    let size = items.len().div_ceil(threads);
    let parts: Vec<Option<Vec<R>>> = std::thread::scope(|scope| {
        let handles: Vec<_> = items
            .chunks(size)
            .map(|chunk| {
                let f = &f;
                scope.spawn(move || {
                    let out = f(chunk);
                    (out.len() == chunk.len()).then_some(out)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().ok().flatten())
            .collect()
    });
    parts
        .into_iter()
        .collect::<Option<Vec<Vec<R>>>>()
        .map(|p| p.into_iter().flatten().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_come_back_in_order_whatever_the_threads() {
        let items: Vec<u32> = (0..1000).collect();
        for threads in [1, 2, 3, 7] {
            for n in [0, 1, 31, 33, 1000] {
                let out = par_chunks(&items[..n], threads, |c| c.iter().map(|x| x * 2).collect())
                    .expect("no panic");
                assert_eq!(out, items[..n].iter().map(|x| x * 2).collect::<Vec<_>>());
            }
        }
        assert!(par_chunks(&items, 2, |c| c[1..].to_vec()).is_none());
    }
}
