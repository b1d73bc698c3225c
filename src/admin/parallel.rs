//! Work over a large slice split across the machine's cores, results kept in the slice's order.
//!
//! A 100,000-image catalog is 100,000 files to read, 100,000 entries to check and 100,000 bundle
//! entries to render; each item is independent of the others, so every core takes a contiguous part
//! and the parts' results are joined in order (the output is the same as one pass would give).

/// At most this many threads: an administrator's workstation or CI runner is shared, and a catalog's
/// reads stop scaling with threads once the file system is the bound.
const MAX_THREADS: usize = 8;

/// Calls `work` on contiguous parts of `items`, one per core (at most [`MAX_THREADS`]), each with the
/// index of its first item, and returns the parts' results in the order of the parts. A small slice
/// (or a one-core machine) is done on the calling thread. A panic in a part is passed on.
pub fn in_parts<T: Sync, R: Send>(items: &[T], work: impl Fn(usize, &[T]) -> R + Sync) -> Vec<R> {
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(MAX_THREADS);
    if threads == 1 || items.len() < 2 * threads {
        return vec![work(0, items)];
    }
    let chunk = items.len().div_ceil(threads);
    let work = &work;
    std::thread::scope(|scope| {
        let workers: Vec<_> = items
            .chunks(chunk)
            .enumerate()
            .map(|(i, part)| scope.spawn(move || work(i * chunk, part)))
            .collect();
        workers
            .into_iter()
            // A part that panicked would lose its items' results: pass the panic on.
            .map(|w| w.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::in_parts;

    #[test]
    fn parts_cover_the_slice_once_in_order() {
        for n in [0, 1, 3, 17, 1000] {
            let items: Vec<usize> = (0..n).collect();
            let parts = in_parts(&items, |start, part| {
                part.iter()
                    .enumerate()
                    .map(|(i, &x)| {
                        assert_eq!(start + i, x, "a part's start index is its first item's");
                        x * 2
                    })
                    .collect::<Vec<_>>()
            });
            let joined: Vec<usize> = parts.into_iter().flatten().collect();
            assert_eq!(joined, items.iter().map(|x| x * 2).collect::<Vec<_>>());
        }
    }
}
