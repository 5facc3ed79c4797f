//! A panic's message goes through the log queue: a panicking thread is not held by a stderr
//! that takes nothing, and the message reaches the log after the lines before it.
//!
//! Its own test binary: the subscriber and the panic hook are the process's.

use std::io::Read;
use std::time::{Duration, Instant};

use fn_lifecycle::config::LogFormat;

#[test]
fn a_panic_is_logged_through_the_queue_and_never_held_by_a_stalled_log() {
    let (mut reader, out) = std::io::pipe().expect("pipe");
    fn_lifecycle::logging::init_writing_to("info", LogFormat::Text, Box::new(out))
        .expect("a valid level");
    // More than the pipe holds: the log's writer stalls until the test reads.
    let filler = "x".repeat(200 * 1024);
    tracing::info!(filler, "first");

    let started = Instant::now();
    let panicked = std::thread::Builder::new()
        .name("doomed".into())
        .spawn(|| panic!("the message {}", 42))
        .expect("thread");
    assert!(panicked.join().is_err(), "the thread panicked");
    let held = started.elapsed();
    assert!(
        held < Duration::from_secs(3),
        "the panicking thread waited {held:?} for a stalled log"
    );

    // Once the log is read, the filler and then the panic's message are written.
    tracing::info!("after");
    let reading = std::thread::spawn(move || {
        let mut text = Vec::new();
        let mut chunk = [0u8; 64 * 1024];
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            let n = reader.read(&mut chunk).expect("read");
            text.extend_from_slice(&chunk[..n]);
            if n == 0 || String::from_utf8_lossy(&text).contains("after") {
                break;
            }
        }
        String::from_utf8_lossy(&text).into_owned()
    });
    assert!(fn_lifecycle::logging::flush(), "written once read");
    let text = reading.join().expect("reader");
    let first = text.find("first").expect("the first line");
    let panic = text
        .find("thread 'doomed' panicked at crates/lifecycle/tests/panic_hook.rs:")
        .unwrap_or_else(|| {
            panic!(
                "no panic message in the log: {}",
                &text[text.len().saturating_sub(500)..]
            )
        });
    assert!(
        text[panic..].contains("the message 42"),
        "{}",
        &text[panic..]
    );
    assert!(first < panic, "in order");
}
