//! The stack unwinder's entry points, for the static release binary only: none of them can be
//! reached there, so the unwinder library (56 KB) and the backtrace symbolizer behind it
//! (gimli, addr2line and the demangler, 160 KB) are not linked.
//!
//! Why nothing can reach them: the release profile has `panic = "abort"`, so no exception is
//! ever raised and no landing pad runs (`_Unwind_Resume` and the personality routine's
//! accessors are only called while an exception unwinds), and build.rs discards the unwind
//! tables, so a walk of the stack finds no frame to step through anyway. The one caller left
//! is std's panic message, which asks `_Unwind_Backtrace` for the frames when
//! `RUST_BACKTRACE` is set: here the walk ends at once, as it already did without tables, and
//! a panic prints its message and location, then aborts. Because the walk never calls back,
//! the optimiser drops std's symbolizer, which is only called from that callback.
//!
//! build.rs sets `grapheon_no_unwinder` exactly when it discards the tables; `panic = "abort"`
//! is checked here as well, since test builds always unwind.

use std::ffi::{c_int, c_void};

/// `_URC_END_OF_STACK`: the walk found no (further) frame.
const END_OF_STACK: c_int = 5;

/// Walks the stack, calling `trace` once per frame: there is no frame it could step through.
#[no_mangle]
pub extern "C" fn _Unwind_Backtrace(
    _trace: extern "C" fn(*mut c_void, *mut c_void) -> c_int,
    _argument: *mut c_void,
) -> c_int {
    END_OF_STACK
}

/// Continues an unwind after a landing pad; no unwind ever starts with `panic = "abort"`.
#[no_mangle]
pub extern "C" fn _Unwind_Resume(_exception: *mut c_void) -> ! {
    std::process::abort()
}

/// The accessors the personality routine and a backtrace callback call on a frame. Neither
/// runs (see the module comment); reaching one would be a broken build, so it aborts.
macro_rules! unreachable_accessors {
    ($($name:ident($($arg:ident: $ty:ty),*) -> $ret:ty;)*) => {$(
        #[doc = concat!("`", stringify!($name), "`: only called while unwinding, which cannot happen here.")]
        #[no_mangle]
        pub extern "C" fn $name(_context: *mut c_void $(, $arg: $ty)*) -> $ret {
            $(let _ = $arg;)*
            std::process::abort()
        }
    )*};
}

unreachable_accessors! {
    _Unwind_GetIP() -> usize;
    _Unwind_GetIPInfo(before_instruction: *mut c_int) -> usize;
    _Unwind_SetIP(value: usize) -> ();
    _Unwind_SetGR(register: c_int, value: usize) -> ();
    _Unwind_GetLanguageSpecificData() -> *mut c_void;
    _Unwind_GetRegionStart() -> usize;
    _Unwind_GetTextRelBase() -> usize;
    _Unwind_GetDataRelBase() -> usize;
    // std's backtrace callback asks these of a frame too; with the callback dropped nothing
    // refers to them, and defined here they keep the archive's unwinder out if it ever is not.
    _Unwind_GetCFA() -> usize;
    _Unwind_FindEnclosingFunction() -> *mut c_void;
}
