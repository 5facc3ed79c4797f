//! A panic while the log queue is full: its message waits for the lines before it and is
//! written after them, where the full queue dropped it.
//!
//! Its own test binary: the subscriber and the panic hook are the process's.

use std::io::Read;
use std::time::{Duration, Instant};

use fn_lifecycle::config::LogFormat;

#[test]
fn a_panic_while_the_log_queue_is_full_is_written_once_there_is_room() {
    let (mut reader, out) = std::io::pipe().expect("pipe");
    fn_lifecycle::logging::init_writing_to("info", LogFormat::Text, Box::new(out))
        .expect("a valid level");
    // A line the pipe cannot hold stalls the writer; then more lines than the queue holds
    // (8,192), each small, so that the panic's message would fit its bytes but not its
    // count.
    tracing::info!(line = "x".repeat(128 * 1024), "stall");
    for i in 0..9_000 {
        tracing::info!(i, "filler");
    }
    assert!(
        fn_lifecycle::logging::dropped_lines() > 0,
        "the queue is full"
    );
    let panicked = std::thread::Builder::new()
        .name("doomed".into())
        .spawn(|| panic!("the message {}", 7))
        .expect("thread");
    // The panic has met the full queue; then the log is read.
    std::thread::sleep(Duration::from_millis(200));
    let reading = std::thread::spawn(move || {
        let mut text = Vec::new();
        let mut chunk = vec![0u8; 1 << 20];
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            let n = reader.read(&mut chunk).expect("read");
            let from = text.len().saturating_sub(5);
            text.extend_from_slice(&chunk[..n]);
            if n == 0 || text[from..].windows(5).any(|w| w == b"after") {
                break;
            }
        }
        String::from_utf8_lossy(&text).into_owned()
    });
    assert!(panicked.join().is_err(), "the thread panicked");
    // Room in the queue for the last line, which ends the reading.
    assert!(fn_lifecycle::logging::flush(), "the queue written out");
    tracing::info!("after");
    assert!(fn_lifecycle::logging::flush(), "written once read");
    let text = reading.join().expect("reader");
    // This test's own failure would go to the log only: say it on stderr too.
    let found = text.find("thread 'doomed' panicked at");
    if found.is_none() {
        eprintln!(
            "no panic message in the log: {}",
            &text[text.len().saturating_sub(300)..]
        );
    }
    let at = text.find("thread 'doomed' panicked at").unwrap_or_else(|| {
        panic!(
            "no panic message in the log: {}",
            &text[text.len().saturating_sub(300)..]
        )
    });
    assert!(text[at..].contains("the message 7"), "{}", &text[at..]);
}
