//! What a function answers: status, headers and a body.
//!
//! The FDK carries these to the runner in the contract's wire form (see [`crate::headers`]);
//! a function writes its headers plainly. One it names `Fn-Http-H-X` all the same goes as it
//! is (as with Fn's Go FDK) and reaches the client as `X`.

use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};

use crate::body::ResponseBody;

/// A function's answer to one call.
#[derive(Debug)]
pub struct Response {
    status: StatusCode,
    headers: HeaderMap,
    body: ResponseBody,
}

impl Response {
    /// A `200 OK` answer with `body` and no headers.
    pub fn new(body: impl Into<ResponseBody>) -> Self {
        Self {
            status: StatusCode::OK,
            headers: HeaderMap::new(),
            body: body.into(),
        }
    }

    /// Sets the status the client receives.
    #[must_use]
    pub fn with_status(mut self, status: StatusCode) -> Self {
        self.status = status;
        self
    }

    /// Adds a header value (an existing header of that name keeps its values).
    #[must_use]
    pub fn with_header(mut self, name: HeaderName, value: HeaderValue) -> Self {
        self.headers.append(name, value);
        self
    }

    /// The status the client receives.
    #[must_use]
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The headers the client receives.
    #[must_use]
    pub fn headers(&self) -> &HeaderMap {
        &self.headers
    }

    /// The headers the client receives, to change.
    pub fn headers_mut(&mut self) -> &mut HeaderMap {
        &mut self.headers
    }

    /// Takes the answer apart.
    #[must_use]
    pub fn into_parts(self) -> (StatusCode, HeaderMap, ResponseBody) {
        (self.status, self.headers, self.body)
    }
}
