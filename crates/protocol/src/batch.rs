//! Messages that leave together.
//!
//! A sender gathers the messages that are ready at one moment into one [`Batch`] and hands
//! the batch over; [`batches`] turns batches back into the message stream that tonic
//! encodes. tonic's encoder takes messages for as long as its source has them ready, so the
//! messages of one batch are encoded into one chunk and leave in one write, whichever thread
//! runs the encoder. A batch marked `last` ends the stream with it, so the end of the stream
//! (END_STREAM, or the server's trailers) goes in the same write rather than whenever the
//! sender happens to be dropped.
//!
//! Each write wakes the peer, and on a small machine a wake-up costs more than the bytes: a
//! call whose messages leave one by one costs its peer one wake-up per message.

use std::pin::Pin;
use std::task::{Context, Poll};

use futures::Stream;
use tokio::sync::mpsc;

/// Messages to send in one go.
#[derive(Debug)]
pub struct Batch<T> {
    pub messages: Vec<T>,
    /// The stream ends after these messages.
    pub last: bool,
}

/// The messages of the batches received on `rx`, in order, ending right after the batch
/// marked `last` (or when every sender is gone).
pub fn batches<T>(rx: mpsc::Receiver<Batch<T>>) -> Batches<T> {
    Batches {
        rx: Some(rx),
        current: Vec::new().into_iter(),
        ended: false,
    }
}

/// Like [`batches`], starting with `first` (a batch already taken from `rx`).
pub fn batches_after<T>(first: Batch<T>, rx: mpsc::Receiver<Batch<T>>) -> Batches<T> {
    Batches {
        rx: Some(rx),
        current: first.messages.into_iter(),
        ended: first.last,
    }
}

/// A stream of just `messages`, known whole in advance: no channel behind it.
pub fn only<T>(messages: Vec<T>) -> Batches<T> {
    Batches {
        rx: None,
        current: messages.into_iter(),
        ended: true,
    }
}

/// The stream [`batches`] returns.
#[derive(Debug)]
pub struct Batches<T> {
    /// Where the next batches come from; `None` for [`only`].
    rx: Option<mpsc::Receiver<Batch<T>>>,
    /// What is left of the batch being read.
    current: std::vec::IntoIter<T>,
    /// The batch being read is the last.
    ended: bool,
}

impl<T> Unpin for Batches<T> {}

impl<T> Stream for Batches<T> {
    type Item = T;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T>> {
        let this = self.get_mut();
        loop {
            if let Some(message) = this.current.next() {
                return Poll::Ready(Some(message));
            }
            let Some(rx) = this.rx.as_mut().filter(|_| !this.ended) else {
                return Poll::Ready(None);
            };
            match rx.poll_recv(cx) {
                Poll::Ready(Some(batch)) => {
                    this.current = batch.messages.into_iter();
                    this.ended = batch.last;
                }
                Poll::Ready(None) => {
                    this.ended = true;
                    return Poll::Ready(None);
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::{FutureExt, StreamExt};

    #[tokio::test]
    async fn a_batch_is_ready_at_once_and_the_last_one_ends_the_stream() {
        let (tx, rx) = mpsc::channel(4);
        let mut stream = Box::pin(batches(rx));
        tx.send(Batch {
            messages: vec![1, 2, 3],
            last: false,
        })
        .await
        .expect("open");
        // All three are ready without waiting: one poll of the encoder takes them all.
        let ready: Vec<_> = (0..3)
            .filter_map(|_| stream.next().now_or_never().flatten())
            .collect();
        assert_eq!(ready, [1, 2, 3]);
        assert!(stream.next().now_or_never().is_none(), "nothing more yet");
        tx.send(Batch {
            messages: vec![4],
            last: true,
        })
        .await
        .expect("open");
        assert_eq!(stream.next().await, Some(4));
        // Ended by `last`, with the sender still alive.
        assert_eq!(stream.next().now_or_never(), Some(None));
        drop(tx);
    }

    #[tokio::test]
    async fn only_is_its_messages_then_the_end_at_once() {
        let mut stream = only(vec!["TryCall", "data", "eof"]);
        let ready: Vec<_> = (0..4)
            .map(|_| stream.next().now_or_never().expect("never waits"))
            .collect();
        assert_eq!(ready, [Some("TryCall"), Some("data"), Some("eof"), None]);
    }

    #[tokio::test]
    async fn a_batch_taken_first_comes_first() {
        let (tx, rx) = mpsc::channel(4);
        tx.send(Batch {
            messages: vec![3],
            last: true,
        })
        .await
        .expect("open");
        let first = Batch {
            messages: vec![1, 2],
            last: false,
        };
        let all: Vec<_> = batches_after(first, rx).collect().await;
        assert_eq!(all, [1, 2, 3]);
        let (_tx, rx) = mpsc::channel::<Batch<u8>>(4);
        let only = Batch {
            messages: vec![9],
            last: true,
        };
        let all: Vec<_> = batches_after(only, rx).collect().await;
        assert_eq!(
            all,
            [9],
            "a last first batch ends the stream without waiting"
        );
    }

    #[tokio::test]
    async fn batches_after_the_last_are_dropped_and_a_gone_sender_ends_the_stream() {
        let (tx, rx) = mpsc::channel(4);
        tx.send(Batch {
            messages: vec!["a"],
            last: true,
        })
        .await
        .expect("open");
        tx.send(Batch {
            messages: vec!["late"],
            last: false,
        })
        .await
        .expect("open");
        let all: Vec<_> = batches(rx).collect().await;
        assert_eq!(all, ["a"]);

        let (tx, rx) = mpsc::channel(4);
        tx.send(Batch {
            messages: vec![1, 2],
            last: false,
        })
        .await
        .expect("open");
        drop(tx);
        let all: Vec<_> = batches(rx).collect().await;
        assert_eq!(all, [1, 2]);
    }
}
