//! The `process` driver: function instances as child processes on the Fn FDK `http-stream` contract.
