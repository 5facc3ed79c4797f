//! The codec of the generated gRPC clients and servers (`codec_path` in build.rs): prost's
//! ([`tonic_prost::ProstCodec`]), except that a received message's repeated fields are
//! counted on its wire bytes before prost decodes it ([`crate::wire`]).
//!
//! The Engage stream does not go through it ([`crate::framing`] checks its messages); the
//! messages it guards are those of the peers' other calls: a runner's reports
//! (`RunnerState.warm`), an npm's runner lists (`LBGroupMembership.runners`) and an LB's
//! adverts (`CapacitySnapshotList.snapshots`). Within tonic's 4 MiB a message of 2 million
//! empty entries decoded into 96–168 MiB at its peak (24–42 times its size on the wire);
//! over the limits of [`crate::wire`], it is refused with `OUT_OF_RANGE` before any of it is
//! decoded.

use std::marker::PhantomData;

use bytes::Buf;
use tonic::Status;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

use crate::wire::{CHECKED_FROM, WireLimits};

/// prost's codec, with the count of [`WireLimits`] before a message is decoded.
#[derive(Debug)]
pub struct CheckedCodec<T, U> {
    _messages: PhantomData<(T, U)>,
}

impl<T, U> Default for CheckedCodec<T, U> {
    fn default() -> Self {
        CheckedCodec {
            _messages: PhantomData,
        }
    }
}

impl<T, U> Codec for CheckedCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + WireLimits + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = CheckedDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::default().encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        CheckedDecoder {
            prost: ProstCodec::<T, U>::default().decoder(),
        }
    }
}

/// prost's decoder, behind the count of [`WireLimits`].
#[derive(Debug)]
pub struct CheckedDecoder<U> {
    prost: ProstDecoder<U>,
}

impl<U: prost::Message + Default + WireLimits> Decoder for CheckedDecoder<U> {
    type Item = U;
    type Error = Status;

    /// # Errors
    /// `OUT_OF_RANGE` for a message over a limit of [`WireLimits`]; prost's own errors.
    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        // tonic holds a whole message in one buffer, so its chunk is all of it. Were it
        // not, the walk would take the rest for a cut message and let prost decide.
        let message = buf.chunk();
        debug_assert_eq!(message.len(), buf.remaining(), "one slice");
        if message.len() >= CHECKED_FROM {
            U::check_wire(message)?;
        }
        self.prost.decode(buf)
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.prost.buffer_settings()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::poolmanager::node_pool_scaler_server::{NodePoolScaler, NodePoolScalerServer};
    use crate::poolmanager::runner_manager_client::RunnerManagerClient;
    use crate::poolmanager::{
        CapacitySnapshot, CapacitySnapshotList, LbGroupId, LbGroupMembership, MembershipChanged,
        Runner,
    };
    use crate::runner::{RunnerState, WarmFunction};
    use crate::wire::{
        MAX_ADVERTISED_GROUPS, MAX_CHANGED_GROUPS, MAX_LISTED_RUNNERS, MAX_WARM_ENTRIES,
    };
    use bytes::Bytes;
    use http_body::Frame;
    use http_body_util::{BodyExt, Full, StreamBody};
    use prost::Message;
    use std::convert::Infallible;
    use std::task::{Context, Poll};
    use tonic::Code;
    use tonic::codec::Streaming;
    use tonic::codegen::Service;

    /// tonic's 4 MiB (its default receive limit, which no daemon changes).
    const TONIC_MAX: usize = 4 * 1024 * 1024;

    /// `message` behind gRPC's header.
    fn framed(message: &[u8]) -> Bytes {
        let mut wire = vec![0];
        wire.extend_from_slice(&u32::try_from(message.len()).expect("small").to_be_bytes());
        wire.extend_from_slice(message);
        wire.into()
    }

    /// The one message of a request body of `message`, as tonic decodes it with this codec.
    async fn decoded<U>(message: &[u8]) -> Result<U, Status>
    where
        U: prost::Message + Default + WireLimits + Send + 'static,
    {
        let decoder = CheckedCodec::<(), U>::default().decoder();
        let mut stream = Streaming::new_request(decoder, Full::new(framed(message)), None, None);
        stream
            .message()
            .await?
            .ok_or_else(|| Status::unknown("no message"))
    }

    fn assert_refused<U>(result: Result<U, Status>, field: &str) {
        let Err(status) = result else {
            panic!("decoded");
        };
        assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
        assert!(
            status
                .message()
                .contains(&format!("{field} in one message")),
            "{status:?}"
        );
    }

    /// The worst message within tonic's limit, of empty entries (two bytes each), is
    /// refused before prost decodes it; one at the limit decodes.
    #[tokio::test]
    async fn a_message_of_too_many_empty_entries_is_refused_before_decoding() {
        let warm = |n| {
            RunnerState {
                warm: vec![WarmFunction::default(); n],
                ..RunnerState::default()
            }
            .encode_to_vec()
        };
        let worst = warm(TONIC_MAX / 2 - 8);
        assert!(worst.len() <= TONIC_MAX);
        assert_refused(decoded::<RunnerState>(&worst).await, "warm functions");
        let at = decoded::<RunnerState>(&warm(MAX_WARM_ENTRIES)).await;
        assert_eq!(at.expect("decodes").warm.len(), MAX_WARM_ENTRIES);

        let runners = |n| {
            LbGroupMembership {
                group_id: "g".into(),
                runners: vec![Runner::default(); n],
            }
            .encode_to_vec()
        };
        assert_refused(
            decoded::<LbGroupMembership>(&runners(TONIC_MAX / 2 - 8)).await,
            "runners",
        );
        let at = decoded::<LbGroupMembership>(&runners(MAX_LISTED_RUNNERS)).await;
        assert_eq!(at.expect("decodes").runners.len(), MAX_LISTED_RUNNERS);

        let advert = |n| {
            CapacitySnapshotList {
                lb_id: "lb".into(),
                snapshots: vec![CapacitySnapshot::default(); n],
                ..CapacitySnapshotList::default()
            }
            .encode_to_vec()
        };
        assert_refused(
            decoded::<CapacitySnapshotList>(&advert(TONIC_MAX / 2 - 8)).await,
            "capacity snapshots",
        );
        let at = decoded::<CapacitySnapshotList>(&advert(MAX_ADVERTISED_GROUPS)).await;
        assert_eq!(at.expect("decodes").snapshots.len(), MAX_ADVERTISED_GROUPS);

        let changed = |n| {
            MembershipChanged {
                version: 1,
                groups: vec![String::new(); n],
            }
            .encode_to_vec()
        };
        assert_refused(
            decoded::<MembershipChanged>(&changed(TONIC_MAX / 2 - 8)).await,
            "changed groups",
        );
        let at = decoded::<MembershipChanged>(&changed(MAX_CHANGED_GROUPS)).await;
        assert_eq!(at.expect("decodes").groups.len(), MAX_CHANGED_GROUPS);
    }

    /// An npm that would take any advert.
    struct TakesAll;

    #[tonic::async_trait]
    impl NodePoolScaler for TakesAll {
        async fn advertise_capacity(
            &self,
            _: tonic::Request<CapacitySnapshotList>,
        ) -> Result<tonic::Response<()>, Status> {
            Ok(tonic::Response::new(()))
        }
    }

    /// The generated server decodes with this codec: a crafted advert is refused before
    /// the service sees it.
    #[tokio::test]
    async fn the_generated_server_refuses_a_crafted_advert() {
        let advert = CapacitySnapshotList {
            lb_id: "lb".into(),
            snapshots: vec![CapacitySnapshot::default(); TONIC_MAX / 2 - 8],
            ..CapacitySnapshotList::default()
        }
        .encode_to_vec();
        let request = http::Request::builder()
            .method("POST")
            .uri("/dataplane.poolmanager.v1.NodePoolScaler/AdvertiseCapacity")
            .header("content-type", "application/grpc")
            .body(Full::new(framed(&advert)))
            .expect("a request");
        let mut server = NodePoolScalerServer::new(TakesAll);
        let response = server.call(request).await.expect("infallible");
        let (head, body) = response.into_parts();
        let status = match Status::from_header_map(&head.headers) {
            Some(status) => status,
            None => {
                let trailers = body.collect().await.expect("a body").trailers().cloned();
                trailers
                    .and_then(|t| Status::from_header_map(&t))
                    .expect("a grpc-status")
            }
        };
        assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
        assert!(
            status
                .message()
                .contains("more than 16384 capacity snapshots"),
            "{status:?}"
        );
    }

    /// An npm that answers every call with the same response body.
    #[derive(Clone)]
    struct Canned(Bytes);

    type CannedBody =
        StreamBody<futures::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, Infallible>>>>;

    impl Service<http::Request<tonic::body::Body>> for Canned {
        type Response = http::Response<CannedBody>;
        type Error = Infallible;
        type Future = std::future::Ready<Result<Self::Response, Infallible>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: http::Request<tonic::body::Body>) -> Self::Future {
            let mut trailers = http::HeaderMap::new();
            trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
            let frames = vec![
                Ok(Frame::data(self.0.clone())),
                Ok(Frame::trailers(trailers)),
            ];
            let response = http::Response::builder()
                .header("content-type", "application/grpc")
                .body(StreamBody::new(futures::stream::iter(frames)))
                .expect("a response");
            std::future::ready(Ok(response))
        }
    }

    /// The generated client decodes with this codec too: an LB given a crafted runner list
    /// gets an error, not the list.
    #[tokio::test]
    async fn the_generated_client_refuses_a_crafted_runner_list() {
        let list = LbGroupMembership {
            group_id: "g".into(),
            runners: vec![Runner::default(); TONIC_MAX / 2 - 8],
        }
        .encode_to_vec();
        let mut client = RunnerManagerClient::with_origin(
            Canned(framed(&list)),
            http::Uri::from_static("http://npm"),
        );
        let got = client.get_lb_group(LbGroupId { id: "g".into() }).await;
        assert_refused(got.map(tonic::Response::into_inner), "runners");
    }
}
