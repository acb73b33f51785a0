//! Work on every core: the engine prepares received and loaded documents in parallel.

/// Maps `f` over `items` on `threads` threads and returns the results in order, or `None` if a
/// thread panicked. Work is taken in small slices from a shared counter, so that a thread that
/// drew heavy items (Contracts) does not leave the others idle.
pub fn par_map<T: Sync, R: Send>(
    items: &[T],
    threads: usize,
    f: impl Fn(&T) -> R + Sync,
) -> Option<Vec<R>> {
    par_map_taking(items, threads, 16, f)
}

/// [`par_map`] for items that are each much work (a slice of documents): taken one at a time.
pub fn par_map_each<T: Sync, R: Send>(
    items: &[T],
    threads: usize,
    f: impl Fn(&T) -> R + Sync,
) -> Option<Vec<R>> {
    par_map_taking(items, threads, 1, f)
}

/// [`par_map`], each thread taking `slice` items at a time.
fn par_map_taking<T: Sync, R: Send>(
    items: &[T],
    threads: usize,
    slice: usize,
    f: impl Fn(&T) -> R + Sync,
) -> Option<Vec<R>> {
    let slice = slice.max(1);
    let threads = threads.clamp(1, 16).min(items.len().div_ceil(slice).max(1));
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
                        let start = next.fetch_add(slice, std::sync::atomic::Ordering::Relaxed);
                        if start >= items.len() {
                            break done;
                        }
                        let end = (start + slice).min(items.len());
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_come_back_in_order_whatever_the_threads() {
        let items: Vec<u32> = (0..1000).collect();
        for threads in [1, 2, 3, 7] {
            for n in [0, 1, 15, 17, 1000] {
                let want: Vec<u32> = items[..n].iter().map(|x| x * 2).collect();
                let out = par_map(&items[..n], threads, |x| x * 2).expect("no panic");
                assert_eq!(out, want);
                let out = par_map_each(&items[..n], threads, |x| x * 2).expect("no panic");
                assert_eq!(out, want);
            }
        }
    }
}
