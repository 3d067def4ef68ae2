//! What a request body says about its cost, read in one pass over its bytes: the prompt's
//! tokens are counted as the parser meets the text, and the few fields the gateway needs are
//! kept; nothing else is built (a `serde_json::Value` tree of even a small chat request is a
//! few dozen allocations).
//!
//! It reads a body exactly as looking fields up in its `Value` would: the last of duplicate
//! keys wins, a field of the wrong type counts as absent, `text` before `content`.
use std::fmt;

use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::Value;

use super::{PER_MESSAGE, REPLY_PRIMING, Tokenizer};

/// The fields of a request body that decide what it costs.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Shape {
    /// The body is a JSON object (anything else is not a request the gateway meters).
    pub is_object: bool,
    pub model: Option<String>,
    pub stream: Option<bool>,
    /// `stream_options.include_usage`.
    pub include_usage: Option<bool>,
    /// The three fields that cap a completion, by API (see [`Self::max_completion_tokens`]).
    pub max_completion_tokens: Option<u64>,
    pub max_tokens: Option<u64>,
    pub max_output_tokens: Option<u64>,
    pub n: Option<u64>,
    pub best_of: Option<u64>,
    /// Which of the fields that tell the APIs apart are present (any type).
    pub has_messages: bool,
    pub has_prompt: bool,
    pub has_input: bool,
    pub has_model: bool,
    /// Prompt tokens: messages (with the chat format's own), prompt, input, instructions,
    /// tool definitions.
    pub prompt_tokens: u64,
}

impl Shape {
    /// The most completion tokens the request allows, from whichever field its API uses.
    pub fn max_completion_tokens(&self) -> Option<u64> {
        self.max_completion_tokens
            .or(self.max_tokens)
            .or(self.max_output_tokens)
    }
}

impl Tokenizer {
    /// Reads `body` (JSON) for its cost; an error is JSON that does not parse.
    pub fn shape(&self, body: &[u8]) -> Result<Shape, serde_json::Error> {
        let mut de = serde_json::Deserializer::from_slice(body);
        let shape = BodySeed(*self).deserialize(&mut de)?;
        de.end()?;
        Ok(shape)
    }
}

/// Drains the rest of a sequence or map the reader has no use for.
fn drain_seq<'de, A: SeqAccess<'de>>(mut seq: A) -> Result<(), A::Error> {
    while seq.next_element::<IgnoredAny>()?.is_some() {}
    Ok(())
}

fn drain_map<'de, A: MapAccess<'de>>(mut map: A) -> Result<(), A::Error> {
    while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
    Ok(())
}

/// A scalar read leniently: its value when it has the type wanted, `None` otherwise.
macro_rules! lenient {
    ($name:ident, $ty:ty, $what:literal, { $($body:tt)* }) => {
        struct $name;

        impl<'de> DeserializeSeed<'de> for $name {
            type Value = Option<$ty>;
            fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
                d.deserialize_any(self)
            }
        }

        impl<'de> Visitor<'de> for $name {
            type Value = Option<$ty>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str($what)
            }
            $($body)*
            fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> { Ok(None) }
            fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> { Ok(None) }
            fn visit_unit<E>(self) -> Result<Self::Value, E> { Ok(None) }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
                drain_seq(seq).map(|_| None)
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                drain_map(map).map(|_| None)
            }
        }
    };
}

lenient!(AsBool, bool, "any JSON value", {
    fn visit_bool<E>(self, v: bool) -> Result<Self::Value, E> {
        Ok(Some(v))
    }
    fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
        Ok(None)
    }
});

lenient!(AsU64, u64, "any JSON value", {
    fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
        Ok(Some(v))
    }
    fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
        Ok(None)
    }
});

lenient!(AsString, String, "any JSON value", {
    fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Some(v.to_owned()))
    }
});

/// `stream_options`: its `include_usage`, when it is an object.
struct StreamOptions;

impl<'de> DeserializeSeed<'de> for StreamOptions {
    type Value = Option<bool>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for StreamOptions {
    type Value = Option<bool>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
        drain_seq(seq).map(|_| None)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut include = None;
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            if key == "include_usage" {
                include = map.next_value_seed(AsBool)?;
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(include)
    }
}

/// Where a value that carries text sits: its own (a field's value) or an array's item (where
/// a number is a token id, one token).
#[derive(Clone, Copy)]
struct Text {
    tok: Tokenizer,
    item: bool,
}

impl<'de> DeserializeSeed<'de> for Text {
    type Value = u64;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<u64, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Text {
    type Value = u64;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<u64, E> {
        Ok(0)
    }
    fn visit_i64<E>(self, _: i64) -> Result<u64, E> {
        Ok(u64::from(self.item))
    }
    fn visit_u64<E>(self, _: u64) -> Result<u64, E> {
        Ok(u64::from(self.item))
    }
    fn visit_f64<E>(self, _: f64) -> Result<u64, E> {
        Ok(u64::from(self.item))
    }
    fn visit_unit<E>(self) -> Result<u64, E> {
        Ok(0)
    }
    fn visit_str<E>(self, v: &str) -> Result<u64, E> {
        Ok(self.tok.count(v))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<u64, A::Error> {
        let item = Text {
            tok: self.tok,
            item: true,
        };
        let mut n = 0;
        while let Some(k) = seq.next_element_seed(item)? {
            n += k;
        }
        Ok(n)
    }
    /// A content part: its `text`, else its `content`.
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<u64, A::Error> {
        let own = Text {
            tok: self.tok,
            item: false,
        };
        let (mut text, mut content) = (None, None);
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            match &*key {
                "text" => text = Some(map.next_value_seed(own)?),
                "content" => content = Some(map.next_value_seed(own)?),
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(text.or(content).unwrap_or(0))
    }
}

/// One chat message: the format's own tokens, its role, content and name.
#[derive(Clone, Copy)]
struct Message(Tokenizer);

impl<'de> DeserializeSeed<'de> for Message {
    type Value = u64;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<u64, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Message {
    type Value = u64;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<u64, E> {
        Ok(PER_MESSAGE)
    }
    fn visit_i64<E>(self, _: i64) -> Result<u64, E> {
        Ok(PER_MESSAGE)
    }
    fn visit_u64<E>(self, _: u64) -> Result<u64, E> {
        Ok(PER_MESSAGE)
    }
    fn visit_f64<E>(self, _: f64) -> Result<u64, E> {
        Ok(PER_MESSAGE)
    }
    fn visit_unit<E>(self) -> Result<u64, E> {
        Ok(PER_MESSAGE)
    }
    fn visit_str<E>(self, _: &str) -> Result<u64, E> {
        Ok(PER_MESSAGE)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<u64, A::Error> {
        drain_seq(seq).map(|_| PER_MESSAGE)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<u64, A::Error> {
        let tok = self.0;
        let (mut role, mut content, mut name) = (0, 0, 0);
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            match &*key {
                "role" => {
                    role = map
                        .next_value_seed(AsString)?
                        .map_or(0, |r| tok.count_role(&r));
                }
                "content" => content = map.next_value_seed(Text { tok, item: false })?,
                "name" => {
                    name = map
                        .next_value_seed(AsString)?
                        .map_or(0, |n| 1 + tok.count(&n));
                }
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(PER_MESSAGE + role + content + name)
    }
}

/// `messages`: its tokens when it is an array (with the reply's priming).
struct Messages(Tokenizer);

impl<'de> DeserializeSeed<'de> for Messages {
    type Value = Option<u64>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Messages {
    type Value = Option<u64>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        drain_map(map).map(|_| None)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut n = REPLY_PRIMING;
        while let Some(k) = seq.next_element_seed(Message(self.0))? {
            n += k;
        }
        Ok(Some(n))
    }
}

/// The whole body.
struct BodySeed(Tokenizer);

impl<'de> DeserializeSeed<'de> for BodySeed {
    type Value = Shape;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Shape, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for BodySeed {
    type Value = Shape;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<Shape, E> {
        Ok(Shape::default())
    }
    fn visit_i64<E>(self, _: i64) -> Result<Shape, E> {
        Ok(Shape::default())
    }
    fn visit_u64<E>(self, _: u64) -> Result<Shape, E> {
        Ok(Shape::default())
    }
    fn visit_f64<E>(self, _: f64) -> Result<Shape, E> {
        Ok(Shape::default())
    }
    fn visit_str<E>(self, _: &str) -> Result<Shape, E> {
        Ok(Shape::default())
    }
    fn visit_unit<E>(self) -> Result<Shape, E> {
        Ok(Shape::default())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Shape, A::Error> {
        drain_seq(seq).map(|_| Shape::default())
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Shape, A::Error> {
        let tok = self.0;
        let text = Text { tok, item: false };
        let mut s = Shape {
            is_object: true,
            ..Shape::default()
        };
        // Per field, the last occurrence's tokens.
        let (mut messages, mut prompt, mut input, mut instructions, mut tools) = (None, 0, 0, 0, 0);
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            match &*key {
                "model" => {
                    s.has_model = true;
                    s.model = map.next_value_seed(AsString)?;
                }
                "messages" => {
                    s.has_messages = true;
                    messages = map.next_value_seed(Messages(tok))?;
                }
                "prompt" => {
                    s.has_prompt = true;
                    prompt = map.next_value_seed(text)?;
                }
                "input" => {
                    s.has_input = true;
                    input = map.next_value_seed(text)?;
                }
                "instructions" => instructions = map.next_value_seed(text)?,
                "tools" => {
                    // Tool schemas reach the model as text: their JSON length is a fair
                    // estimate (as compact JSON, whatever the client's spacing).
                    let v: Value = map.next_value()?;
                    tools = tok.count(&v.to_string());
                }
                "stream" => s.stream = map.next_value_seed(AsBool)?,
                "stream_options" => s.include_usage = map.next_value_seed(StreamOptions)?,
                "max_completion_tokens" => s.max_completion_tokens = map.next_value_seed(AsU64)?,
                "max_tokens" => s.max_tokens = map.next_value_seed(AsU64)?,
                "max_output_tokens" => s.max_output_tokens = map.next_value_seed(AsU64)?,
                "n" => s.n = map.next_value_seed(AsU64)?,
                "best_of" => s.best_of = map.next_value_seed(AsU64)?,
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        s.prompt_tokens = messages.unwrap_or(0) + prompt + input + instructions + tools;
        Ok(s)
    }
}
