//! A mutex-protected value in memory mapped shared *before* any fork, so every process of a
//! fork-based model (and every thread of the others) sees and updates the same value.
//!
//! The lock is a POSIX process-shared, robust mutex: if a process dies while holding it (a
//! worker killed mid-update), the next locker is told so and takes the lock over instead of
//! waiting forever. The value must be plain data (`Copy`, no pointers), since its bytes are
//! shared between address spaces. This file holds all of the lifecycle layer's `unsafe`.

use std::io;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

/// A `T` behind a process-shared robust mutex, in an anonymous shared mapping.
pub(crate) struct SharedMutex<T: Copy> {
    region: NonNull<Region<T>>,
}

#[repr(C)]
struct Region<T> {
    lock: libc::pthread_mutex_t,
    value: T,
}

// SAFETY: the value is only reached through `lock`, which serialises access across threads and
// processes; `T: Copy + Send` holds no pointers into one address space.
unsafe impl<T: Copy + Send> Send for SharedMutex<T> {}
// SAFETY: as above: every access goes through the mutex.
unsafe impl<T: Copy + Send> Sync for SharedMutex<T> {}

/// Plain data for which all-zero bytes are a valid value, so a fresh anonymous mapping (which
/// the kernel zero-fills) already holds one, without building a large value on the stack.
///
/// # Safety
/// All-zero bytes must be a valid `Self`, and `Self` must hold no pointers.
pub(crate) unsafe trait Zeroable: Copy {}

// SAFETY: zero is a valid integer and holds no pointer.
unsafe impl Zeroable for u64 {}
// SAFETY: as above.
unsafe impl Zeroable for u32 {}

/// Maps `size` bytes of anonymous memory shared with every process forked afterwards: zero-filled
/// and page-aligned, never moved. The one place the project calls mmap for shared state
/// (per-source table, counters, the forced-exit flag).
pub(crate) fn map_shared_zeroed(size: usize) -> io::Result<NonNull<u8>> {
    // SAFETY: an anonymous shared mapping of `size` bytes; no file, no fixed address.
    let mapped = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            size,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if mapped == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    Ok(NonNull::new(mapped.cast::<u8>()).expect("mmap never returns null on success"))
}

impl<T: Zeroable> SharedMutex<T> {
    /// Maps a shared region holding a zeroed `T` and its lock.
    pub(crate) fn new_zeroed() -> io::Result<Self> {
        let size = std::mem::size_of::<Region<T>>();
        let mapped = map_shared_zeroed(size)?.as_ptr().cast::<libc::c_void>();
        let region = mapped.cast::<Region<T>>();
        // SAFETY: `region` points to `size` fresh, zero-filled, writable, page-aligned bytes (so
        // aligned for `Region<T>`, and a valid `T` since `T: Zeroable`); the mutex attributes
        // are initialised before use and destroyed after.
        unsafe {
            let mut attr: libc::pthread_mutexattr_t = std::mem::zeroed();
            let mut rc = libc::pthread_mutexattr_init(&mut attr);
            if rc == 0 {
                rc = libc::pthread_mutexattr_setpshared(&mut attr, libc::PTHREAD_PROCESS_SHARED);
            }
            if rc == 0 {
                rc = libc::pthread_mutexattr_setrobust(&mut attr, libc::PTHREAD_MUTEX_ROBUST);
            }
            if rc == 0 {
                rc = libc::pthread_mutex_init(std::ptr::addr_of_mut!((*region).lock), &attr);
            }
            libc::pthread_mutexattr_destroy(&mut attr);
            if rc != 0 {
                libc::munmap(mapped, size);
                return Err(io::Error::from_raw_os_error(rc));
            }
        }
        Ok(SharedMutex {
            region: NonNull::new(region).expect("mmap never returns null on success"),
        })
    }
}

impl<T: Copy> SharedMutex<T> {
    /// Locks the value. A holder that died is taken over: the value may be midway through an
    /// update, which for counters and timestamps means one stale entry, not a broken table.
    pub(crate) fn lock(&self) -> SharedGuard<'_, T> {
        let lock = self.lock_ptr();
        // SAFETY: the mutex was initialised in `new` and lives as long as the mapping.
        let rc = unsafe { libc::pthread_mutex_lock(lock) };
        if rc == libc::EOWNERDEAD {
            // SAFETY: we hold the lock (EOWNERDEAD still acquires it).
            unsafe { libc::pthread_mutex_consistent(lock) };
        } else {
            assert_eq!(rc, 0, "pthread_mutex_lock on a valid robust mutex");
        }
        SharedGuard { mutex: self }
    }

    fn lock_ptr(&self) -> *mut libc::pthread_mutex_t {
        // SAFETY: `region` is valid for the mapping's lifetime.
        unsafe { std::ptr::addr_of_mut!((*self.region.as_ptr()).lock) }
    }
}

impl<T: Copy> Drop for SharedMutex<T> {
    fn drop(&mut self) {
        // SAFETY: nothing can hold the lock (guards borrow `self`); unmapping the whole region.
        unsafe {
            libc::pthread_mutex_destroy(self.lock_ptr());
            libc::munmap(
                self.region.as_ptr().cast(),
                std::mem::size_of::<Region<T>>(),
            );
        }
    }
}

/// The locked value; unlocks on drop.
pub(crate) struct SharedGuard<'a, T: Copy> {
    mutex: &'a SharedMutex<T>,
}

impl<T: Copy> Deref for SharedGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: the lock is held, so no other thread or process touches the value.
        unsafe { &(*self.mutex.region.as_ptr()).value }
    }
}

impl<T: Copy> DerefMut for SharedGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: the lock is held, so this is the only reference.
        unsafe { &mut (*self.mutex.region.as_ptr()).value }
    }
}

impl<T: Copy> Drop for SharedGuard<'_, T> {
    fn drop(&mut self) {
        // SAFETY: this guard holds the lock.
        unsafe { libc::pthread_mutex_unlock(self.mutex.lock_ptr()) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_across_threads() {
        let shared = std::sync::Arc::new(SharedMutex::<u64>::new_zeroed().unwrap());
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let shared = shared.clone();
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        *shared.lock() += 1;
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(*shared.lock(), 4000);
    }

    #[test]
    fn shared_with_a_forked_child() {
        let shared = SharedMutex::<u32>::new_zeroed().unwrap();
        // SAFETY: the child only touches the shared mapping and exits with _exit; the test
        // harness's other threads are not used by it.
        match unsafe { libc::fork() } {
            0 => {
                *shared.lock() = 42;
                // SAFETY: _exit ends the child at once, running no destructor of the parent's.
                unsafe { libc::_exit(0) };
            }
            pid if pid > 0 => {
                let mut status = 0;
                // SAFETY: waiting for our own child.
                unsafe { libc::waitpid(pid, &mut status, 0) };
                assert_eq!(
                    *shared.lock(),
                    42,
                    "the child's write is seen by the parent"
                );
            }
            _ => panic!("fork failed"),
        }
    }
}
