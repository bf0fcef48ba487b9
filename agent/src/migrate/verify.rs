//! Cutover step 7 of a live migration (`ferry migrate --live --verify`):
//! the digest of the old plane at the fenced position and the new plane's
//! must agree, read directly or, with a version migration chain, through
//! the chain.

use std::time::Duration;

use ferry_engine::migrations::chain::Chain;
use ferry_proto::v1::{DigestRequest, DigestResponse};
use tracing::info;

use super::cutover::Running;
use super::plan::digest_entry_of;
use super::versions;
use crate::remote::status_text;

/// Cutover step 7: the digest of the old plane at the fenced position and
/// the new plane's now (writes are held, the target has applied through the
/// fence) must agree, within `budget`. Returns the keys compared.
pub(super) async fn verify(
    running: &mut Running,
    key_prefix: &[u8],
    fenced_position: u64,
    budget: Duration,
) -> Result<u64, String> {
    let mut source = running.source.clone();
    let old = source.digest(DigestRequest {
        key_prefix: key_prefix.to_vec().into(),
        position: fenced_position,
    });
    let (old, new) = beside_the_new_plane_digest(running, key_prefix, budget, old).await?;
    let old = old
        .map_err(|status| {
            format!(
                "the source agent could not digest the old plane at {fenced_position}: {}",
                status_text(&status)
            )
        })?
        .into_inner();
    if (old.keys, old.bytes, &old.sha256) != (new.keys, new.bytes, &new.sha256) {
        return Err(format!(
            "the digest check failed: the old plane at position {fenced_position} holds {} keys ({} bytes, sha256 {}), the new plane {} keys ({} bytes, sha256 {}); nothing was switched",
            old.keys,
            old.bytes,
            hex::encode(&old.sha256),
            new.keys,
            new.bytes,
            hex::encode(&new.sha256)
        ));
    }
    info!(keys = old.keys, sha256 = %hex::encode(&old.sha256), "the planes' digests agree");
    Ok(old.keys)
}

/// Runs `old` (the old plane's side of the check) beside the target agent's
/// digest of the new plane, both within `budget`.
async fn beside_the_new_plane_digest<T>(
    running: &mut Running,
    key_prefix: &[u8],
    budget: Duration,
    old: impl std::future::Future<Output = T>,
) -> Result<(T, DigestResponse), String> {
    let new = running.target.digest(DigestRequest {
        key_prefix: key_prefix.to_vec().into(),
        position: 0,
    });
    let (old, new) = tokio::time::timeout(budget, async { tokio::join!(old, new) })
        .await
        .map_err(|_| {
            format!(
                "the digest check did not finish within what --max-pause left ({budget:?}): raise --max-pause or migrate without --verify"
            )
        })?;
    let new = new
        .map_err(|status| {
            format!(
                "the target agent could not digest the new plane: {}",
                status_text(&status)
            )
        })?
        .into_inner();
    Ok((old, new))
}

/// Step 7 through a version chain: the new plane holds the chain's image of
/// the old plane at F. The old plane is read again through the chain and
/// summed up whatever order its image comes in; the new plane's digest is
/// its order-independent one.
pub(super) async fn verify_through_chain(
    running: &mut Running,
    chain: Chain,
    key_prefix: &[u8],
    fenced_position: u64,
    budget: Duration,
) -> Result<u64, String> {
    let entry = digest_entry_of(&running.target_description)
        .map_err(|error| format!("{error}; nothing was switched"))?;
    let mut source = running.source.clone();
    let image = versions::image_digest(&mut source, chain, key_prefix, running.epoch, entry);
    let (image, new) = beside_the_new_plane_digest(running, key_prefix, budget, image).await?;
    let (position, image) = image.map_err(|error| {
        format!("the version chain's image of the old plane could not be digested: {error}; nothing was switched")
    })?;
    if position != fenced_position {
        return Err(format!(
            "the old plane moved past its fence: it was read at position {position}, fenced at {fenced_position}; nothing was switched"
        ));
    }
    if new.set_sha256.is_empty() {
        return Err("the target agent gives no order-independent digest (it is older than this ferry), which --verify through --migrations compares: upgrade it, or migrate without --verify; nothing was switched".to_owned());
    }
    let image_sum = image.sum();
    if (image.keys, image.bytes, &image_sum[..]) != (new.keys, new.bytes, &new.set_sha256[..]) {
        return Err(format!(
            "the digest check failed: the version chain's image of the old plane at position {fenced_position} holds {} keys ({} bytes, set sha256 {}), the new plane {} keys ({} bytes, set sha256 {}); nothing was switched",
            image.keys,
            image.bytes,
            hex::encode(image_sum),
            new.keys,
            new.bytes,
            hex::encode(&new.set_sha256)
        ));
    }
    info!(keys = image.keys, set_sha256 = %hex::encode(image_sum), "the new plane holds the chain's image of the old one");
    Ok(image.keys)
}
