//! Typed identifiers (TypeID spec v0.3, UUIDv7 suffix).
//!
//! Every record kind has its own prefix, so an id of one kind can never be
//! mistaken for another: parsing `kpol_…` as a [`KeyId`] is an error, not a
//! lookup that happens to miss.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use type_safe_id::{StaticType, TypeSafeId};

/// An id string that did not parse as the expected kind of id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("expected an id of the form `{expected}_<26 base32 chars>`: {reason}")]
pub struct IdParseError {
    /// The prefix that was expected (`akey`, `kpol`, …).
    pub expected: &'static str,
    /// Why the string was refused.
    pub reason: String,
}

macro_rules! typed_id {
    ($(#[$doc:meta])* $name:ident, $tag:ident, $prefix:literal) => {
        #[doc = concat!("Type tag for ids starting with `", $prefix, "_`.")]
        #[derive(Debug, Default, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $tag;

        impl StaticType for $tag {
            const TYPE: &'static str = $prefix;
        }

        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(TypeSafeId<$tag>);

        impl $name {
            /// The TypeID prefix of this kind of id.
            pub const PREFIX: &'static str = $prefix;

            /// A new id. UUIDv7 suffixes are monotonic within a process, so ids
            /// sort in creation order.
            pub fn new() -> Self {
                Self(TypeSafeId::from_uuid(uuid::Uuid::now_v7()))
            }

            /// The UUID behind the id.
            pub fn uuid(&self) -> uuid::Uuid {
                self.0.uuid()
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::new()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0, f)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.0)
            }
        }

        impl FromStr for $name {
            type Err = IdParseError;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                TypeSafeId::<$tag>::from_str(s).map(Self).map_err(|e| IdParseError {
                    expected: $prefix,
                    reason: e.to_string(),
                })
            }
        }

        #[cfg(feature = "openapi")]
        impl utoipa::PartialSchema for $name {
            fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
                utoipa::openapi::ObjectBuilder::new()
                    .schema_type(utoipa::openapi::schema::Type::String)
                    .description(Some(concat!("TypeID with prefix `", $prefix, "_`")))
                    .pattern(Some(concat!("^", $prefix, "_[0-7][0-9a-hjkmnp-tv-z]{25}$")))
                    .into()
            }
        }

        #[cfg(feature = "openapi")]
        impl utoipa::ToSchema for $name {}

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

typed_id!(
    /// Id of an API key (`akey_…`). It stays the same across rotations.
    KeyId, KeyTag, "akey"
);
typed_id!(
    /// Id of a policy (`kpol_…`).
    PolicyId, PolicyTag, "kpol"
);
typed_id!(
    /// Id of a scope (`kscp_…`).
    ScopeId, ScopeTag, "kscp"
);
typed_id!(
    /// Id of a usage record (`kusg_…`).
    UsageId, UsageTag, "kusg"
);
typed_id!(
    /// Id of a rotation record (`krot_…`).
    RotationId, RotationTag, "krot"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_carry_their_prefix() {
        let id = KeyId::new();
        let s = id.to_string();
        assert!(s.starts_with("akey_"), "{s}");
        assert_eq!(s.len(), "akey_".len() + 26);
        assert_eq!(s.parse::<KeyId>().unwrap(), id);
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, format!("\"{s}\""));
        assert_eq!(serde_json::from_str::<KeyId>(&json).unwrap(), id);
    }

    #[test]
    fn wrong_kind_of_id_is_an_error() {
        let policy = PolicyId::new().to_string();
        let err = policy.parse::<KeyId>().unwrap_err();
        assert_eq!(err.expected, "akey");
        assert!(serde_json::from_str::<KeyId>(&format!("\"{policy}\"")).is_err());
        for bad in [
            "",
            "akey_",
            "akey_123",
            "akey_ZZZZZZZZZZZZZZZZZZZZZZZZZZ",
            "01h2xcejqtf2nbrexx3vqjhp41",
        ] {
            assert!(bad.parse::<KeyId>().is_err(), "{bad}");
        }
    }

    #[test]
    fn spec_example_parses_to_its_uuid() {
        // From the TypeID v0.3 spec's valid examples.
        let id: TypeSafeId<type_safe_id::DynamicType> =
            "prefix_01h455vb4pex5vsknk084sn02q".parse().unwrap();
        assert_eq!(
            id.uuid().to_string(),
            "01890a5d-ac96-774b-bcce-b302099a8057"
        );
    }

    #[test]
    fn ids_sort_in_creation_order() {
        let ids: Vec<KeyId> = (0..200).map(|_| KeyId::new()).collect();
        let mut sorted = ids.clone();
        sorted.sort();
        assert_eq!(ids, sorted);
        let strings: Vec<String> = ids.iter().map(ToString::to_string).collect();
        let mut sorted_strings = strings.clone();
        sorted_strings.sort();
        assert_eq!(strings, sorted_strings);
    }
}
