//! The bounded outcome vocabularies: where an event came from, why one was
//! refused, what became of an item, why an action was given up. Each
//! `as_str` is the metric label and the stored form, and each `ALL` is what
//! telemetry pre-creates, so a label that was never pre-created cannot be
//! written.

/// An enum of label values with `ALL`, `as_str`, `Display` and serde as the
/// label string.
macro_rules! labels {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident => $label:literal,)+ }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vdoc])* $variant,)+
        }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant,)+];

            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $label,)+
                }
            }

            pub fn parse(s: &str) -> Option<$name> {
                $name::ALL.iter().copied().find(|v| v.as_str() == s)
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str> as serde::Deserialize>::deserialize(d)?;
                $name::parse(&s).ok_or_else(|| {
                    serde::de::Error::custom(format!(
                        concat!("unknown ", stringify!($name), " {:?}"),
                        s
                    ))
                })
            }
        }
    };
}

labels! {
    /// Where an event entered (`source` label).
    Source {
        Webhook => "webhook",
        Amqp => "amqp",
    }
}

labels! {
    /// Why an event was refused at the edge (`reason` label of
    /// `events_rejected_total`).
    RejectReason {
        SignatureMissing => "signature_missing",
        SignatureMismatch => "signature_mismatch",
        Timestamp => "timestamp",
        Malformed => "malformed",
        UnknownType => "unknown_type",
        TooLarge => "too_large",
        UnsupportedMediaType => "unsupported_media_type",
        Unavailable => "unavailable",
    }
}

labels! {
    /// What became of one item of a call (`result` label).
    ItemResult {
        /// The vendor applied it.
        Applied => "applied",
        /// Nothing to do: already gone, or superseded.
        Noop => "noop",
        /// Sent again.
        Retried => "retried",
        /// Given up, with a dead letter.
        DeadLettered => "dead_lettered",
    }
}

labels! {
    /// Why an action (or a whole event) was given up (`reason` label of
    /// `dead_letters_total`, and the stored dead letter's reason).
    DeadLetterReason {
        /// The vendor refused the request as invalid.
        BadRequest => "bad_request",
        /// A vendor limit other than the two below.
        Limit => "limit",
        /// 130006: the channel has as many subscribers as it may.
        ChannelFull => "channel_full",
        /// 130010: the user is subscribed to as many channels as they may.
        SubscriptionLimit => "subscription_limit",
        /// The event's targets could not be read from upstream.
        ResolutionFailed => "resolution_failed",
        /// The vendor reported this item failed on every attempt.
        ItemFailed => "item_failed",
        /// An answer we cannot classify, on every attempt.
        UnknownError => "unknown_error",
        /// Transient failures for longer than `give_up_after_seconds`.
        RetriesExhausted => "retries_exhausted",
        /// Accepted under a rule the configuration no longer has.
        UnknownType => "unknown_type",
        /// Accepted, but no longer parses as an event.
        Malformed => "malformed",
        /// A completion callback the app's receiver did not take (2xx)
        /// within `callbacks.max_age`.
        CallbackExpired => "callback_expired",
    }
}

labels! {
    /// Why an event's record was not kept (`reason` label of
    /// `records_dropped_total`).
    RecordDrop {
        /// The store's writer was too far behind.
        QueueFull => "queue_full",
        /// Writes kept failing and too many records were held meanwhile.
        StorageError => "storage_error",
        /// Handed over after the store closed.
        Shutdown => "shutdown",
    }
}

labels! {
    /// What one completion callback attempt got (`result` label of
    /// `callback_deliveries_total`).
    CallbackResult {
        /// A 2xx answer.
        Delivered => "delivered",
        /// Any other answer; retried.
        Rejected => "rejected",
        /// No answer (connection refused, timeout, ...); retried.
        Unreachable => "unreachable",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_round_trip_through_serde_and_parse() {
        for r in DeadLetterReason::ALL {
            let json = serde_json::to_string(r).unwrap();
            assert_eq!(json, format!("\"{}\"", r.as_str()));
            assert_eq!(serde_json::from_str::<DeadLetterReason>(&json).unwrap(), *r);
        }
        assert_eq!(
            RejectReason::parse("too_large"),
            Some(RejectReason::TooLarge)
        );
        assert!(serde_json::from_str::<ItemResult>("\"nope\"").is_err());
    }
}
