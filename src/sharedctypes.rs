//! Plain data in shared memory (Python's `multiprocessing.sharedctypes`):
//! [`Value`] and [`Array`] with a lock of their own, [`RawValue`] and [`RawArray`] without.
//!
//! The element type is any [`Pod`] type ("plain old data": integers, floats, arrays of
//! them, `#[repr(C)]` structs of them with `#[derive(bytemuck::Pod, bytemuck::Zeroable)]`):
//! types whose every bit pattern is valid and that hold no pointers, so that another
//! process can read them safely. Anything else is refused at compile time.
//!
//! ```
//! use multiprocess::{Array, Process, Value};
//!
//! fn work(args: (Value<f64>, Array<i32>)) {
//!     let (num, arr) = args;
//!     *num.lock() = 2.5;
//!     for x in arr.lock().iter_mut() {
//!         *x = -*x;
//!     }
//! }
//!
//! let num = Value::new(0.0f64)?;
//! let arr = Array::from_slice(&(0..10).collect::<Vec<i32>>())?;
//! let p = Process::new(work, (num.clone(), arr.clone()));
//! p.start()?;
//! p.join()?;
//! assert_eq!(num.get(), 2.5);
//! assert_eq!(arr.to_vec(), (0..10).map(|x| -x).collect::<Vec<i32>>());
//! # Ok::<(), multiprocess::Error>(())
//! ```
//!
//! Each object is an anonymous shared segment (a `memfd`): it lives while some process
//! holds a handle, and is freed with the last one, whatever way the processes end.
//! Python's default lock for `Value` is recursive; here it is a plain [`Lock`], which is
//! faster and enough for guard-scoped access.
#![allow(unsafe_code)]

use crate::error::{Error, Result};
use crate::synchronize::{Lock, LockGuard, LockWord};
use crate::sys::region::{magic, Region};
pub use bytemuck::Pod;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::marker::PhantomData;
use std::mem::{align_of, size_of};
use std::ops::{Deref, DerefMut};
use std::sync::Arc;
use std::time::Duration;

/// A new region of `len` elements, holding `init` if given (else zeros).
fn region<H: crate::sys::region::Atomics, T: Pod>(
    magic: u32,
    len: usize,
    init: Option<&[T]>,
) -> Result<Arc<Region<H>>> {
    let r = Region::<H>::new(
        c"multiprocess-sharedctypes",
        magic,
        size_of::<T>(),
        align_of::<T>(),
        len,
    )
    .map_err(|e| match e.kind() {
        std::io::ErrorKind::InvalidInput => Error::InvalidArgument(e.to_string()),
        _ => Error::Io(e),
    })?;
    if let Some(init) = init {
        // SAFETY: the region was just made for `len` elements of T and no other handle to
        // it exists yet, so this is the only access. (A fresh memfd is already zero.)
        unsafe { r.slice_mut::<T>() }.copy_from_slice(init);
    }
    Ok(Arc::new(r))
}

fn receive<'de, D: Deserializer<'de>, H: crate::sys::region::Atomics, T>(
    d: D,
    magic: u32,
) -> Result<Arc<Region<H>>, D::Error> {
    let map = crate::reduction::deserialize_sealed(d)?;
    Region::from_mapping(map, &[magic], Some((size_of::<T>(), align_of::<T>())))
        .map(Arc::new)
        .map_err(|e| serde::de::Error::custom(format!("{e} ({})", std::any::type_name::<T>())))
}

macro_rules! serde_impls {
    ($ty:ident, $magic:expr) => {
        impl<T: Pod> Serialize for $ty<T> {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                self.region.mapping().serialize(s)
            }
        }

        impl<'de, T: Pod> Deserialize<'de> for $ty<T> {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                Ok($ty {
                    region: receive::<D, _, T>(d, $magic)?,
                    _t: PhantomData,
                })
            }
        }

        impl<T> Clone for $ty<T> {
            fn clone(&self) -> Self {
                $ty {
                    region: self.region.clone(),
                    _t: PhantomData,
                }
            }
        }
    };
}

/// As `serde_impls`, for the types whose region is held by their `Lock`.
macro_rules! locked_serde_impls {
    ($ty:ident, $magic:expr) => {
        impl<T: Pod> Serialize for $ty<T> {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                self.lock.region.mapping().serialize(s)
            }
        }

        impl<'de, T: Pod> Deserialize<'de> for $ty<T> {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                Ok($ty {
                    lock: Lock::from_region(receive::<D, _, T>(d, $magic)?),
                    _t: PhantomData,
                })
            }
        }

        impl<T> Clone for $ty<T> {
            fn clone(&self) -> Self {
                $ty {
                    lock: self.lock.clone(),
                    _t: PhantomData,
                }
            }
        }
    };
}

/// One `T` in shared memory, with a [`Lock`] (Python's `multiprocessing.Value`).
///
/// [`lock`](Value::lock) gives a guard that derefs to `&mut T`; [`get`](Value::get) and
/// [`set`](Value::set) take the lock for one read or write (Python's `.value`). Note that
/// `v.set(v.get() + 1)` is two separate critical sections: increment with
/// `*v.lock() += 1`.
///
/// ```
/// use multiprocess::Value;
///
/// let counter = Value::new(0u64)?;
/// *counter.lock() += 5;
/// assert_eq!(counter.get(), 5);
/// # Ok::<(), multiprocess::Error>(())
/// ```
pub struct Value<T> {
    lock: Lock,
    _t: PhantomData<T>,
}

locked_serde_impls!(Value, magic::VALUE);

impl<T: Pod> Value<T> {
    /// A new shared value holding `v`.
    ///
    /// # Errors
    /// [`Error::Io`] if the shared memory cannot be made (no memory, or no descriptor left).
    pub fn new(v: T) -> Result<Value<T>> {
        Ok(Value {
            lock: Lock::from_region(region(magic::VALUE, 1, Some(&[v]))?),
            _t: PhantomData,
        })
    }

    fn region(&self) -> &Region<LockWord> {
        &self.lock.region
    }

    fn guard<'a>(&'a self, guard: LockGuard<'a>) -> ValueGuard<'a, T> {
        ValueGuard {
            // SAFETY: the region was made for one T (checked on receipt too), and the
            // guard holds the value's lock, which every locked access to the payload
            // takes, for as long as the reference lives.
            value: unsafe { &mut self.region().slice_mut::<T>()[0] },
            guard,
        }
    }

    /// Takes the lock (blocking) and gives access to the value.
    pub fn lock(&self) -> ValueGuard<'_, T> {
        self.guard(self.lock.acquire())
    }

    /// Takes the lock if it is free.
    pub fn try_lock(&self) -> Option<ValueGuard<'_, T>> {
        Some(self.guard(self.lock.try_acquire()?))
    }

    /// Waits at most `timeout` for the lock; [`Error::Timeout`] if it stays taken.
    ///
    /// # Errors
    /// [`Error::Timeout`] if a live holder keeps the lock for `timeout`.
    pub fn lock_timeout(&self, timeout: Duration) -> Result<ValueGuard<'_, T>> {
        Ok(self.guard(self.lock.acquire_timeout(timeout)?))
    }

    /// Reads the value under the lock.
    pub fn get(&self) -> T {
        *self.lock()
    }

    /// Writes the value under the lock.
    pub fn set(&self, v: T) {
        *self.lock() = v;
    }

    /// The value's lock (Python's `get_lock()`): a handle to the same lock, to hold it
    /// across several operations or to give it to a [`Condition`](crate::Condition).
    /// While you hold it through this handle, use [`get_raw`](Value::get_raw) rather
    /// than [`lock`](Value::lock), which would wait for ever.
    pub fn get_lock(&self) -> Lock {
        self.lock.clone()
    }

    /// Reads the value without taking the lock (a volatile copy; it may tear if another
    /// process writes at the same time).
    pub fn get_raw(&self) -> T {
        self.region().read_volatile(0)
    }

    /// Writes the value without taking the lock (see [`get_raw`](Value::get_raw)).
    pub fn set_raw(&self, v: T) {
        self.region().write_volatile(0, v)
    }
}

impl<T: Pod + fmt::Debug> fmt::Debug for Value<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Value").field(&self.get_raw()).finish()
    }
}

/// Access to a [`Value`] under its lock; releases the lock on drop.
#[must_use = "the lock is released as soon as the guard is dropped"]
pub struct ValueGuard<'a, T> {
    value: &'a mut T,
    guard: LockGuard<'a>,
}

impl<T> ValueGuard<'_, T> {
    /// Whether a process died holding the lock before us (see [`LockGuard::owner_died`]):
    /// the value may be half-written.
    pub fn owner_died(&self) -> bool {
        self.guard.owner_died()
    }
}

impl<T> Deref for ValueGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        self.value
    }
}

impl<T> DerefMut for ValueGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        self.value
    }
}

impl<T: fmt::Debug> fmt::Debug for ValueGuard<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&**self, f)
    }
}

/// A fixed-length array of `T` in shared memory, with a [`Lock`] (Python's
/// `multiprocessing.Array`). [`lock`](Array::lock) gives a guard that derefs to
/// `&mut [T]`.
///
/// ```
/// use multiprocess::Array;
///
/// let a = Array::<u8>::zeroed(4)?;
/// a.lock().copy_from_slice(b"abcd");
/// assert_eq!(a.to_vec(), b"abcd");
/// # Ok::<(), multiprocess::Error>(())
/// ```
pub struct Array<T> {
    lock: Lock,
    _t: PhantomData<T>,
}

locked_serde_impls!(Array, magic::ARRAY);

impl<T: Pod> Array<T> {
    /// A new shared array holding a copy of `init`.
    ///
    /// # Errors
    /// [`Error::Io`] if the shared memory cannot be made (no memory, or no descriptor left).
    pub fn from_slice(init: &[T]) -> Result<Array<T>> {
        Ok(Array {
            lock: Lock::from_region(region(magic::ARRAY, init.len(), Some(init))?),
            _t: PhantomData,
        })
    }

    /// A new shared array of `len` zeroed elements.
    ///
    /// # Errors
    /// [`Error::Io`] if the shared memory cannot be made (no memory, or no descriptor left).
    pub fn zeroed(len: usize) -> Result<Array<T>> {
        Ok(Array {
            lock: Lock::from_region(region::<_, T>(magic::ARRAY, len, None)?),
            _t: PhantomData,
        })
    }

    /// Element `i`, read under the lock (Python's `arr[i]`); `None` past the end.
    pub fn get(&self, i: usize) -> Option<T> {
        self.lock().get(i).copied()
    }

    /// Writes element `i` under the lock; [`Error::InvalidArgument`] past the end.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] if `i` is past the end.
    pub fn set(&self, i: usize, v: T) -> Result<()> {
        let mut g = self.lock();
        let len = g.len();
        let slot = g.get_mut(i).ok_or_else(|| {
            Error::InvalidArgument(format!("index {i} out of range for an Array of {len}"))
        })?;
        *slot = v;
        Ok(())
    }

    /// The number of elements.
    pub fn len(&self) -> usize {
        self.lock.region.len()
    }

    /// Whether the array has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn guard<'a>(&'a self, guard: LockGuard<'a>) -> ArrayGuard<'a, T> {
        ArrayGuard {
            // SAFETY: the region holds len() elements of T (checked on receipt), and the
            // guard holds the array's lock, which every access to the payload takes.
            slice: unsafe { self.lock.region.slice_mut::<T>() },
            guard,
        }
    }

    /// Takes the lock (blocking) and gives access to the elements.
    pub fn lock(&self) -> ArrayGuard<'_, T> {
        self.guard(self.lock.acquire())
    }

    /// Takes the lock if it is free.
    pub fn try_lock(&self) -> Option<ArrayGuard<'_, T>> {
        Some(self.guard(self.lock.try_acquire()?))
    }

    /// Waits at most `timeout` for the lock; [`Error::Timeout`] if it stays taken.
    ///
    /// # Errors
    /// [`Error::Timeout`] if a live holder keeps the lock for `timeout`.
    pub fn lock_timeout(&self, timeout: Duration) -> Result<ArrayGuard<'_, T>> {
        Ok(self.guard(self.lock.acquire_timeout(timeout)?))
    }

    /// A copy of the elements, taken under the lock.
    pub fn to_vec(&self) -> Vec<T> {
        self.lock().to_vec()
    }

    /// The array's lock (Python's `get_lock()`).
    pub fn get_lock(&self) -> Lock {
        self.lock.clone()
    }
}

impl<T: Pod + fmt::Debug> fmt::Debug for Array<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Array").field("len", &self.len()).finish()
    }
}

/// Access to an [`Array`] under its lock; releases the lock on drop.
#[must_use = "the lock is released as soon as the guard is dropped"]
pub struct ArrayGuard<'a, T> {
    slice: &'a mut [T],
    guard: LockGuard<'a>,
}

impl<T> ArrayGuard<'_, T> {
    /// Whether a process died holding the lock before us: the elements may be
    /// half-written.
    pub fn owner_died(&self) -> bool {
        self.guard.owner_died()
    }
}

impl<T> Deref for ArrayGuard<'_, T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        self.slice
    }
}

impl<T> DerefMut for ArrayGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut [T] {
        self.slice
    }
}

/// One `T` in shared memory without a lock (Python's `RawValue`). Reads and writes are
/// single volatile copies: a value wider than the machine word can tear if processes
/// write it concurrently. Use [`Value`] (or your own [`Lock`]) when that matters.
///
/// ```
/// use multiprocess::RawValue;
///
/// let v = RawValue::new([1u16, 2, 3])?;
/// v.set([4, 5, 6]);
/// assert_eq!(v.get(), [4, 5, 6]);
/// # Ok::<(), multiprocess::Error>(())
/// ```
pub struct RawValue<T> {
    region: Arc<Region<()>>,
    _t: PhantomData<T>,
}

serde_impls!(RawValue, magic::RAW_VALUE);

impl<T: Pod> RawValue<T> {
    /// A new shared value holding `v`.
    ///
    /// # Errors
    /// [`Error::Io`] if the shared memory cannot be made (no memory, or no descriptor left).
    pub fn new(v: T) -> Result<RawValue<T>> {
        Ok(RawValue {
            region: region(magic::RAW_VALUE, 1, Some(&[v]))?,
            _t: PhantomData,
        })
    }

    /// Reads the value.
    pub fn get(&self) -> T {
        self.region.read_volatile(0)
    }

    /// Writes the value.
    pub fn set(&self, v: T) {
        self.region.write_volatile(0, v)
    }
}

impl<T: Pod + fmt::Debug> fmt::Debug for RawValue<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("RawValue").field(&self.get()).finish()
    }
}

/// A fixed-length array of `T` in shared memory without a lock (Python's `RawArray`);
/// element reads and writes are volatile copies (see [`RawValue`]).
///
/// ```
/// use multiprocess::RawArray;
///
/// let a = RawArray::<f32>::zeroed(3)?;
/// a.set(1, 2.5)?;
/// assert_eq!(a.to_vec(), [0.0, 2.5, 0.0]);
/// # Ok::<(), multiprocess::Error>(())
/// ```
pub struct RawArray<T> {
    region: Arc<Region<()>>,
    _t: PhantomData<T>,
}

serde_impls!(RawArray, magic::RAW_ARRAY);

impl<T: Pod> RawArray<T> {
    /// A new shared array holding a copy of `init`.
    ///
    /// # Errors
    /// [`Error::Io`] if the shared memory cannot be made (no memory, or no descriptor left).
    pub fn from_slice(init: &[T]) -> Result<RawArray<T>> {
        Ok(RawArray {
            region: region(magic::RAW_ARRAY, init.len(), Some(init))?,
            _t: PhantomData,
        })
    }

    /// A new shared array of `len` zeroed elements.
    ///
    /// # Errors
    /// [`Error::Io`] if the shared memory cannot be made (no memory, or no descriptor left).
    pub fn zeroed(len: usize) -> Result<RawArray<T>> {
        Ok(RawArray {
            region: region::<_, T>(magic::RAW_ARRAY, len, None)?,
            _t: PhantomData,
        })
    }

    /// The number of elements.
    pub fn len(&self) -> usize {
        self.region.len()
    }

    /// Whether the array has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Element `i`; `None` past the end.
    pub fn get(&self, i: usize) -> Option<T> {
        (i < self.len()).then(|| self.region.read_volatile(i))
    }

    /// Writes element `i`; [`Error::InvalidArgument`] past the end.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] if `i` is past the end.
    pub fn set(&self, i: usize, v: T) -> Result<()> {
        if i >= self.len() {
            return Err(Error::InvalidArgument(format!(
                "index {i} out of range for a RawArray of {}",
                self.len()
            )));
        }
        self.region.write_volatile(i, v);
        Ok(())
    }

    /// A copy of every element.
    pub fn to_vec(&self) -> Vec<T> {
        (0..self.len())
            .map(|i| self.region.read_volatile(i))
            .collect()
    }
}

impl<T: Pod + fmt::Debug> fmt::Debug for RawArray<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RawArray")
            .field("len", &self.len())
            .finish()
    }
}
