//! A config value that may be written as one item or a list (`"x"` or `["x", "y"]`),
//! as both config files allow for credentials that are rotated (two at once for a while).

use serde::Deserialize;

/// One value or a list of them.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany<T> {
    /// Written as a single value.
    One(T),
    /// Written as a list.
    Many(Vec<T>),
}

impl<T> OneOrMany<T> {
    /// The values, in order.
    pub fn into_vec(self) -> Vec<T> {
        match self {
            OneOrMany::One(one) => vec![one],
            OneOrMany::Many(many) => many,
        }
    }
}
