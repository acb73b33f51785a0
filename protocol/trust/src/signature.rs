//! The rule a change envelope's signature is checked by, one at a time or many at once.
//!
//! Every node must decide alike on every change, so the rule must not depend on how a node
//! happens to check it. Ed25519 as RFC 8032 leaves it is not such a rule: its cofactorless
//! equation (`verify_strict`) and the random-weighted batch equation can disagree on a signature
//! whose `R` or key carries a small-order component, which a batch accepts with probability ≥ 1/8
//! and a single check never. Change envelopes are therefore checked under the **ZIP-215** rules
//! (the Zcash specification of exactly which Ed25519 signatures are valid, implemented by
//! `ed25519-zebra`): the cofactored equation `[8][s]B = [8]R + [8][k]A`, `s < l`, under which a
//! batch and a single check decide alike, so a receiver may check a whole sync batch at once.
//!
//! On top of ZIP-215, this deployment refuses a key or an `R` that is a point of small order (as
//! `verify_strict` did) or is not canonically encoded (`verify_strict` refused such an `R`; such a
//! key is a re-encoding no honest signer produces): a few byte comparisons, no curve arithmetic. Signatures made by an honest signer (any Ed25519 implementation) pass both rules
//! alike; the one difference from `verify_strict` left is a key or `R` crafted with a torsion
//! component, which ZIP-215 accepts and `verify_strict` refused. Only the key's holder can make
//! such a signature (it is computed with the secret key), so it grants nothing its holder could not
//! sign honestly; and it is decided alike by every node of this version, alone or in a batch.
//!
//! Batches are checked with fresh random 128-bit weights from `rand::rng()` (ChaCha12 seeded from
//! the operating system): an attacker who could predict them could make a batch of bad signatures
//! pass. A batch that fails is halved until the bad signatures are found, so a bad signature is
//! refused alone, and costs a few batches of halving sizes rather than a single check of every
//! good signature beside it.

use std::sync::OnceLock;

use ed25519_zebra::{Signature, VerificationKey, VerificationKeyBytes, batch};

/// Signatures checked together: large enough that the shared work pays (one multiscalar
/// multiplication per batch, one key decompression per author), small enough that a bad
/// signature sends little back to single checks.
pub const BATCH: usize = 256;

/// The encodings (sign bit cleared) of the y-coordinates of the points of small order: a key or
/// `R` whose encoding has one of them is such a point (both signs of x are).
fn small_order_ys() -> &'static [[u8; 32]; 8] {
    static YS: OnceLock<[[u8; 32]; 8]> = OnceLock::new();
    YS.get_or_init(|| {
        curve25519_dalek::constants::EIGHT_TORSION.map(|p| {
            let mut y = p.compress().to_bytes();
            y[31] &= 0x7f;
            y
        })
    })
}

/// Whether `bytes` encode a point this deployment refuses as a key or as a signature's `R`: a
/// y-coordinate not below the field's prime `p = 2^255 - 19` (a non-canonical encoding), or a
/// point of small order. (An x of zero with the sign bit set, the other non-canonical encoding,
/// only occurs at y = ±1, which are points of small order.)
pub fn weak_point(bytes: &[u8; 32]) -> bool {
    let mut y = *bytes;
    y[31] &= 0x7f;
    // Little-endian: y ≥ p exactly when the top byte is 0x7f, the middle ones 0xff and the
    // lowest ≥ 0xed.
    let not_canonical = y[31] == 0x7f && y[1..31].iter().all(|b| *b == 0xff) && y[0] >= 0xed;
    not_canonical || small_order_ys().contains(&y)
}

/// A key ready to check signatures with, if this deployment accepts it as a key.
pub fn key(bytes: &[u8; 32]) -> Option<VerificationKey> {
    if weak_point(bytes) {
        return None;
    }
    VerificationKey::try_from(*bytes).ok()
}

/// Whether `signature` is `key`'s over `message` under the rule of this module.
pub fn verify(key: &VerificationKey, message: &[u8], signature: &[u8; 64]) -> bool {
    let signature = Signature::from_bytes(signature);
    let key_bytes = <[u8; 32]>::try_from(key.as_ref()).unwrap_or([0; 32]);
    !weak_point(&key_bytes)
        && !weak_point(signature.r_bytes())
        && key.verify(&signature, message).is_ok()
}

/// One signature to check: the signer's key, the message and the signature.
#[derive(Debug, Clone)]
pub struct Signed<'a> {
    /// The signer's public key.
    pub key: &'a [u8; 32],
    /// The message signed.
    pub message: Vec<u8>,
    /// The signature.
    pub signature: [u8; 64],
}

/// Checks many signatures; returns for each whether it holds, exactly as [`verify`] decides it
/// (in batches of [`BATCH`]; a batch that fails is halved until the bad signatures are found,
/// and batches of [`SINGLES`] or fewer are checked one signature at a time).
pub fn verify_all(items: &[Signed<'_>]) -> Vec<bool> {
    let mut out: Vec<bool> = items
        .iter()
        .map(|s| !weak_point(s.key) && !weak_point(Signature::from_bytes(&s.signature).r_bytes()))
        .collect();
    let queued: Vec<usize> = (0..items.len()).filter(|i| out[*i]).collect();
    for chunk in queued.chunks(BATCH) {
        settle(items, chunk, &mut out);
    }
    out
}

/// Below this, a failed batch is checked one signature at a time.
pub const SINGLES: usize = 8;

/// Decides the signatures `at` of `items` (none of them weak), writing the verdicts to `out`.
fn settle(items: &[Signed<'_>], at: &[usize], out: &mut [bool]) {
    if at.len() <= SINGLES {
        for &i in at {
            let s = &items[i];
            out[i] = key(s.key).is_some_and(|k| verify(&k, &s.message, &s.signature));
        }
        return;
    }
    let mut verifier = batch::Verifier::new();
    for &i in at {
        let s = &items[i];
        verifier.queue((
            VerificationKeyBytes::from(*s.key),
            Signature::from_bytes(&s.signature),
            s.message.as_slice(),
        ));
    }
    if verifier.verify(rand::rng()).is_ok() {
        return;
    }
    // Some signature is bad: each half is decided on its own, so a bad signature costs a few
    // batches of halving sizes, not a single check of every good one beside it.
    let (left, right) = at.split_at(at.len() / 2);
    settle(items, left, out);
    settle(items, right, out);
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::{Signer as _, SigningKey};

    fn signed(key: &SigningKey, message: &[u8]) -> [u8; 64] {
        key.sign(message).to_bytes()
    }

    #[test]
    fn honest_signatures_pass_alone_and_in_batches() {
        let keys: Vec<SigningKey> = (1..=5u8)
            .map(|n| SigningKey::from_bytes(&[n; 32]))
            .collect();
        let publics: Vec<[u8; 32]> = keys.iter().map(|k| k.verifying_key().to_bytes()).collect();
        let items: Vec<Signed<'_>> = (0..600usize)
            .map(|i| {
                let message = format!("change {i}").into_bytes();
                Signed {
                    key: &publics[i % 5],
                    signature: signed(&keys[i % 5], &message),
                    message,
                }
            })
            .collect();
        assert!(verify_all(&items).iter().all(|ok| *ok));
        for s in &items[..20] {
            let k = key(s.key).expect("an honest key");
            assert!(verify(&k, &s.message, &s.signature));
            assert!(!verify(&k, b"another message", &s.signature));
        }
    }

    #[test]
    fn a_bad_signature_fails_alone_and_leaves_the_rest_of_its_batch_good() {
        let k = SigningKey::from_bytes(&[9; 32]);
        let public = k.verifying_key().to_bytes();
        let mut items: Vec<Signed<'_>> = (0..300usize)
            .map(|i| {
                let message = format!("change {i}").into_bytes();
                Signed {
                    key: &public,
                    signature: signed(&k, &message),
                    message,
                }
            })
            .collect();
        // Another message's signature, a flipped bit, and s ≥ l.
        items[3].signature = items[4].signature;
        items[100].signature[10] ^= 1;
        items[299].signature[63] |= 0xf0;
        let ok = verify_all(&items);
        for (i, ok) in ok.iter().enumerate() {
            assert_eq!(*ok, ![3, 100, 299].contains(&i), "signature {i}");
        }
    }

    #[test]
    fn small_order_and_non_canonical_points_are_refused_as_keys_and_as_r() {
        for p in curve25519_dalek::constants::EIGHT_TORSION {
            let bytes = p.compress().to_bytes();
            assert!(weak_point(&bytes), "{}", hex::encode(bytes));
            let mut flipped = bytes;
            flipped[31] ^= 0x80;
            assert!(weak_point(&flipped), "{}", hex::encode(flipped));
            assert!(key(&bytes).is_none());
        }
        // y = p and y = p + 1 (non-canonical encodings of 0 and 1), and y = 2^255 - 1.
        let mut y = [0xff; 32];
        y[31] = 0x7f;
        y[0] = 0xed;
        assert!(weak_point(&y));
        y[0] = 0xee;
        assert!(weak_point(&y));
        y[0] = 0xff;
        assert!(weak_point(&y));
        // An honest key and the basepoint are fine.
        let honest = SigningKey::from_bytes(&[3; 32]).verifying_key().to_bytes();
        assert!(!weak_point(&honest));
        let b = curve25519_dalek::constants::ED25519_BASEPOINT_POINT
            .compress()
            .to_bytes();
        assert!(!weak_point(&b));

        // A signature by the identity key (small order, k·A = 0): R = [s]B makes the
        // equation hold for any message, and ZIP-215 alone would accept it.
        let identity = p_bytes(curve25519_dalek::edwards::EdwardsPoint::default());
        let s = curve25519_dalek::Scalar::from(7u64);
        let r = p_bytes(curve25519_dalek::constants::ED25519_BASEPOINT_POINT * s);
        let mut sig = [0u8; 64];
        sig[..32].copy_from_slice(&r);
        sig[32..].copy_from_slice(s.as_bytes());
        let zebra = VerificationKey::try_from(identity).expect("decompresses");
        assert!(
            zebra
                .verify(&Signature::from_bytes(&sig), b"anything")
                .is_ok(),
            "ZIP-215 alone accepts it"
        );
        assert!(!verify(&zebra, b"anything", &sig), "this rule does not");
        let items = [Signed {
            key: &identity,
            message: b"anything".to_vec(),
            signature: sig,
        }];
        assert_eq!(verify_all(&items), vec![false]);

        // The one difference from `verify_strict`, as documented: a key's holder who signs
        // with an R carrying a torsion component. ZIP-215 accepts it, alone and in a batch
        // alike; `verify_strict` refused it.
        let signer = SigningKey::from_bytes(&[4; 32]);
        let public = signer.verifying_key().to_bytes();
        let r = curve25519_dalek::Scalar::from(12_345u64);
        let big_r = p_bytes(
            curve25519_dalek::constants::ED25519_BASEPOINT_POINT * r
                + curve25519_dalek::constants::EIGHT_TORSION[1],
        );
        assert!(!weak_point(&big_r));
        let k = {
            use sha2::Digest as _;
            let h = sha2::Sha512::new()
                .chain_update(big_r)
                .chain_update(public)
                .chain_update(b"m")
                .finalize();
            let mut wide = [0u8; 64];
            wide.copy_from_slice(&h);
            curve25519_dalek::Scalar::from_bytes_mod_order_wide(&wide)
        };
        let s = r + k * signer.to_scalar();
        let mut crafted = [0u8; 64];
        crafted[..32].copy_from_slice(&big_r);
        crafted[32..].copy_from_slice(s.as_bytes());
        let alone = verify(&key(&public).expect("honest"), b"m", &crafted);
        let batched = verify_all(&[Signed {
            key: &public,
            message: b"m".to_vec(),
            signature: crafted,
        }]);
        assert!(alone);
        assert_eq!(batched, vec![true], "alone and in a batch decide alike");
        assert!(
            signer
                .verifying_key()
                .verify_strict(b"m", &ed25519_dalek::Signature::from_bytes(&crafted))
                .is_err()
        );
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(24))]
        /// Checked together or one at a time, every signature gets the same verdict, whichever
        /// of them are damaged and however (by two keys, so that batches mix them).
        #[test]
        fn batches_decide_as_single_checks(
            damage in proptest::collection::vec((0usize..40, 0usize..64, 1u8..=255), 0..6)
        ) {
            let keys = [SigningKey::from_bytes(&[5; 32]), SigningKey::from_bytes(&[6; 32])];
            let publics = keys.clone().map(|k| k.verifying_key().to_bytes());
            let mut items: Vec<Signed<'_>> = (0..40usize)
                .map(|i| {
                    let message = format!("change {i}").into_bytes();
                    Signed {
                        key: &publics[i % 2],
                        signature: signed(&keys[i % 2], &message),
                        message,
                    }
                })
                .collect();
            for (i, byte, xor) in damage {
                items[i].signature[byte] ^= xor;
            }
            let alone: Vec<bool> = items
                .iter()
                .map(|s| key(s.key).is_some_and(|k| verify(&k, &s.message, &s.signature)))
                .collect();
            proptest::prop_assert_eq!(verify_all(&items), alone);
        }
    }

    fn p_bytes(p: curve25519_dalek::edwards::EdwardsPoint) -> [u8; 32] {
        p.compress().to_bytes()
    }
}
