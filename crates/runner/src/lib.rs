//! The pure-runner: admits calls that fit, runs them in hot function instances, streams
//! the results back over the `Engage` protocol.

pub mod driver;
