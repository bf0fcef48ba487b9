//! `ferry migrate --live`: moves a live control plane onto a new one while
//! its clients keep writing through the gateway, then switches them over.
//!
//! The steps (`docs/DESIGN.md`, "Live migration: agents, gateway, cutover"):
//! 1. epoch = the highest epoch the target, the old plane's fence record or
//!    a gateway has seen, plus one;
//! 2. the source agent streams a snapshot at position R, relayed here to the
//!    target agent, which applies it exactly once;
//! 3. live changes follow from R+1 until the lag is under `max_lag`;
//! 4. every gateway replica holds new writes and waits for the writes in
//!    flight that a fence does not refuse; each hold is a lease on its Hold
//!    stream ([`gateways`]);
//! 5. the source agent fences the old plane, naming the new one, and reads
//!    its position F; from then on the old plane itself refuses every
//!    gateway's writes (ferry's write alarm and the fence guard);
//! 6. the target applies through F, and records the revision offset;
//! 7. with `verify`, the digests of both planes agree;
//! 8. the switch is committed in the old plane's fence record (the point of
//!    no return), then every gateway switches to the new plane and releases
//!    the held writes;
//! 9. a report: the pause window, ops moved, the lag over time.
//!
//! Any failure before the commit rolls back: the old plane is unfenced and
//! the gateways release the held writes to it. A driver that dies leaves no
//! plane stuck: its holds lapse, and each gateway settles from the fence
//! record (`ferry migrate abort|resume` do the same from any machine,
//! [`decide`]). A broken agent stream is resumed
//! from the target's own checkpoint (G4), without a new snapshot once the
//! first one is through.
//!
//! With a version migration chain ([`MigrateOptions::migrations`]), the
//! relay takes every batch through it on the way to the target; the chain
//! is planned before anything starts, and [`versions`] says how a resume
//! finds its way back from the target's seqs to the source's.
//!
//! The rooms of the live migration (the cutover), one module each:
//! - `options`: what it is told ([`MigrateOptions`], [`VersionMigrations`],
//!   [`Tee`]);
//! - `plan`: connecting, checking the adapters' capabilities, the epoch,
//!   planning the version migration chain, the `--dry-run` plan ([`plan()`]);
//! - `relay`: the ops from the source agent to the target agent (step 2 on),
//!   resumed after breaks;
//! - `cutover`: [`migrate`] itself, following until the lag is small, then
//!   steps 4 to 9 or the rollback;
//! - `verify`: step 7, the digest comparison;
//! - `monitor`: the lag samples and the status file ([`read_status`]);
//! - `report`: the phase, the status and the report ([`MigrationReport`]);
//! - `error`: [`MigrateError`];
//! - `gateways`: every gateway replica, driven as one;
//! - `decide`: `ferry migrate status|resume|abort`;
//! - `versions`: the version migration chain's part of the relay.

mod cutover;
mod decide;
mod error;
mod gateways;
mod monitor;
mod options;
mod plan;
mod relay;
mod report;
mod verify;
mod versions;

pub use cutover::migrate;
pub use decide::{DecideOptions, Decided, LiveStatus, abort, live_status, resume};
pub use error::MigrateError;
pub use monitor::read_status;
pub use options::{MigrateOptions, Tee, VersionMigrations};
pub use plan::{MigrationPlan, plan};
pub use report::{LagSample, MigrationReport, MigrationStatus, Outcome, Phase};
