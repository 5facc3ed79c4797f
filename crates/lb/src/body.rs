//! The response body type every route answers with. A leaf: the front, the invoker and the
//! error mapping all use it, and it uses none of them.

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;

/// Error type of response bodies: a body that fails is cut off.
pub type BodyError = Box<dyn std::error::Error + Send + Sync>;

/// Every response body.
pub type ResponseBody = UnsyncBoxBody<Bytes, BodyError>;
