//! What the docker plane knows of its runner containers beyond what the engine lists: the
//! names a provisioning or a removal under way has claimed ([`Claims`]). Names only, in
//! memory: a restarted npm starts with none.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, PoisonError};

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Names only: what a panicking holder left is still right.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Names claimed by operations under way, each held until its last claim ends: of two
/// claims on one name (two removals of one runner), the first to end leaves the other's.
#[derive(Debug, Default)]
pub(super) struct Claims(Mutex<HashMap<String, usize>>);

impl Claims {
    /// Claims `name` until the returned guard is dropped, however its holder ends.
    pub(super) fn claim(&self, name: &str) -> Claim<'_> {
        *lock(&self.0).entry(name.to_owned()).or_default() += 1;
        Claim {
            claims: self,
            name: name.to_owned(),
        }
    }

    pub(super) fn contains(&self, name: &str) -> bool {
        lock(&self.0).contains_key(name)
    }
}

/// One claim on a name of [`Claims`].
pub(super) struct Claim<'a> {
    claims: &'a Claims,
    name: String,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        let mut claims = lock(&self.claims.0);
        if let Some(count) = claims.get_mut(&self.name) {
            *count -= 1;
            if *count == 0 {
                claims.remove(&self.name);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_stays_claimed_until_its_last_claim_ends() {
        let claims = Claims::default();
        let first = claims.claim("r");
        let second = claims.claim("r");
        drop(first);
        assert!(claims.contains("r"), "the second claim still holds it");
        drop(second);
        assert!(!claims.contains("r"));
    }
}
