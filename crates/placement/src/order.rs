//! [`Order`]: the runner indices to try during one pass, as a non-allocating iterator.

use std::iter::FusedIterator;

/// The runner indices to try during one pass, in order: a permutation of `0..n`.
///
/// Both built-in policies pick a first index and then walk the list circularly, so an `Order` is
/// just `(first, n, how far we got)`: it does not allocate, and it knows its exact length.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Order {
    /// The index tried first; always `< n` when `n > 0`.
    first: usize,
    /// The length of the runner list.
    n: usize,
    /// How many indices have been yielded from the front so far.
    front: usize,
    /// How many indices remain to be yielded in total (front and back).
    remaining: usize,
}

impl Order {
    /// Every index of a list of `n` runners, starting at `first` (taken modulo `n`) and wrapping
    /// around at the end: `first, first + 1, ..., n - 1, 0, ..., first - 1`. Empty for `n == 0`.
    pub fn circular(first: usize, n: usize) -> Self {
        Self {
            first: first.checked_rem(n).unwrap_or(0),
            n,
            front: 0,
            remaining: n,
        }
    }

    /// The `offset`-th index of the walk (`offset < n`). Computed without `first + offset`, which
    /// could overflow for a list close to `usize::MAX` long.
    fn at(&self, offset: usize) -> usize {
        let until_wrap = self.n - self.first;
        if offset < until_wrap {
            self.first + offset
        } else {
            offset - until_wrap
        }
    }
}

impl Iterator for Order {
    type Item = usize;

    fn next(&mut self) -> Option<usize> {
        if self.remaining == 0 {
            return None;
        }
        let idx = self.at(self.front);
        self.front += 1;
        self.remaining -= 1;
        Some(idx)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.remaining, Some(self.remaining))
    }
}

impl DoubleEndedIterator for Order {
    fn next_back(&mut self) -> Option<usize> {
        if self.remaining == 0 {
            return None;
        }
        self.remaining -= 1;
        Some(self.at(self.front + self.remaining))
    }
}

impl ExactSizeIterator for Order {}

impl FusedIterator for Order {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn walks_circularly_from_the_first_index() {
        assert_eq!(
            Order::circular(2, 5).collect::<Vec<_>>(),
            vec![2, 3, 4, 0, 1]
        );
        assert_eq!(Order::circular(0, 3).collect::<Vec<_>>(), vec![0, 1, 2]);
        assert_eq!(
            Order::circular(7, 5).collect::<Vec<_>>(),
            vec![2, 3, 4, 0, 1]
        );
        assert_eq!(Order::circular(0, 1).collect::<Vec<_>>(), vec![0]);
    }

    #[test]
    fn empty_list_gives_an_empty_order() {
        assert_eq!(Order::circular(0, 0).next(), None);
        assert_eq!(Order::circular(usize::MAX, 0).len(), 0);
    }

    #[test]
    fn knows_its_length_and_can_be_walked_from_both_ends() {
        let mut order = Order::circular(3, 4);
        assert_eq!(order.len(), 4);
        assert_eq!(order.next(), Some(3));
        assert_eq!(order.next_back(), Some(2));
        assert_eq!(order.len(), 2);
        assert_eq!(order.collect::<Vec<_>>(), vec![0, 1]);
        assert_eq!(
            Order::circular(3, 4).rev().collect::<Vec<_>>(),
            vec![2, 1, 0, 3]
        );
    }

    #[test]
    fn does_not_overflow_near_usize_max() {
        let n = usize::MAX;
        let mut order = Order::circular(n - 1, n);
        assert_eq!(order.next(), Some(n - 1));
        assert_eq!(order.next(), Some(0));
        assert_eq!(order.next_back(), Some(n - 2));
    }
}
