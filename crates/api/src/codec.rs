//! The protocol's gRPC codec: prost's, except for what a message that does not decode means.
//!
//! tonic's prost codec answers undecodable bytes with INTERNAL, which tells a caller the
//! endpoint is broken and to retry; the bytes are the sender's fault, so here they are
//! INVALID_ARGUMENT. The generated client and server both use it (`build.rs`).

use std::marker::PhantomData;

use prost::Message;
use tonic::Status;
use tonic::codec::{BufferSettings, DecodeBuf};
use tonic_prost::{ProstDecoder, ProstEncoder};

/// The codec of every `gangplank.onboarding.v1` call: encodes `T`, decodes `U`.
#[derive(Debug)]
pub struct Codec<T, U> {
    _messages: PhantomData<fn() -> (T, U)>,
}

impl<T, U> Default for Codec<T, U> {
    fn default() -> Self {
        Self {
            _messages: PhantomData,
        }
    }
}

impl<T, U> Clone for Codec<T, U> {
    fn clone(&self) -> Self {
        Self::default()
    }
}

impl<T, U> tonic::codec::Codec for Codec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = Decoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(buffers())
    }

    fn decoder(&mut self) -> Self::Decoder {
        Decoder {
            prost: ProstDecoder::new(buffers()),
            _message: PhantomData,
        }
    }
}

/// The buffers a stream starts with. tonic's default is 8 KiB each way per call; an agent's
/// Session stream lives for days carrying messages of a few dozen bytes, and at 10,000
/// sessions those two buffers were a quarter of the endpoint's memory. They grow for the
/// occasional large message (boot files) as before.
fn buffers() -> BufferSettings {
    BufferSettings::new(1024, 32 * 1024)
}

/// Decodes `U` with prost; bytes that are not a `U` are INVALID_ARGUMENT.
#[derive(Debug)]
pub struct Decoder<U> {
    prost: ProstDecoder<U>,
    _message: PhantomData<U>,
}

impl<U: Message + Default> tonic::codec::Decoder for Decoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        decode(buf).map(Some)
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.prost.buffer_settings()
    }
}

/// Decodes one `U` from a message's bytes, as the [`Decoder`] does: bytes that are not a `U`
/// are INVALID_ARGUMENT, naming the message and the decode error.
pub fn decode<U: Message + Default>(buf: impl prost::bytes::Buf) -> Result<U, Status> {
    U::decode(buf).map_err(|err| {
        let name = std::any::type_name::<U>().rsplit("::").next().unwrap_or("message");
        Status::invalid_argument(format!(
            "the message is not a valid gangplank.onboarding.v1.{name} ({err}): send messages of this protocol, from a gangplank-agent or a client built from proto/"
        ))
    })
}
