//! Per command: an argument struct (`<Command>Args`, for commands with `'data'`) and a unit type
//! named after the command in CamelCase (`query-status` → [`QueryStatus`]) implementing
//! [`Command`].
//!
//! ```
//! use flotilla_schema::commands::{Command, Memsave};
//! let args: <Memsave as Command>::Args =
//!     serde_json::from_str(r#"{"val": 0, "size": 4096, "filename": "/tmp/m", "cpu-index": 1}"#)
//!         .unwrap();
//! assert_eq!(args.cpu_index, Some(1));
//! assert_eq!(Memsave::NAME, "memsave");
//! ```

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

#[allow(unused_imports)]
use crate::types::*;

/// A QMP command of the schema, as types.
pub trait Command {
    /// The command's name on the wire (`"query-status"`).
    const NAME: &'static str;
    /// The `arguments` object ([`crate::types::Empty`] when the command has none).
    type Args: Serialize + DeserializeOwned + std::fmt::Debug + Clone + PartialEq;
    /// The `return` value ([`crate::types::Empty`] when the command returns nothing).
    type Returns: Serialize + DeserializeOwned + std::fmt::Debug + Clone + PartialEq;

    /// The command's entry in [`crate::table::COMMANDS`].
    fn info() -> &'static crate::table::CommandSpec {
        crate::table::command(Self::NAME).expect("every generated command is in the table")
    }
}

include!(concat!(env!("OUT_DIR"), "/commands.rs"));
