//! The CUDA driver API, loaded from `libcuda.so.1` at run time: the one module of the crate
//! that calls into it. A build with the `cuda` feature therefore loads and runs on a machine
//! without a driver, where [`driver`] reports that CUDA is unavailable.
//!
//! Every entry point is declared here with its result as the plain `i32` the C API returns,
//! so that an error code newer than these declarations (CUDA 13.0 has codes that older
//! bindings lack, such as `CUDA_ERROR_CONTAINED`) is an ordinary error and never an invalid
//! Rust value. Handles are kept as integers; the wrappers below own what they create and
//! release it on drop, and the caller keeps the right context current around them.

use crate::error::{Error, Result};
use std::ffi::{c_char, c_void, CStr};
use std::sync::OnceLock;

/// A device address.
pub(crate) type DevicePtr = u64;

const SUCCESS: i32 = 0;

/// `CU_EVENT_DISABLE_TIMING`: events used only for ordering.
const EVENT_DISABLE_TIMING: u32 = 0x2;
/// `CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES`.
const FUNC_MAX_DYNAMIC_SHARED: i32 = 8;

/// `CU_DEVICE_ATTRIBUTE_*` values the crate reads.
#[derive(Clone, Copy)]
pub(crate) enum Attribute {
    MaxSharedPerBlockOptin = 97,
}

macro_rules! driver_api {
    ($($field:ident = $symbol:literal ($($arg:ty),*);)*) => {
        /// The driver's entry points, resolved once from the loaded library.
        pub(crate) struct Api {
            $($field: unsafe extern "C" fn($($arg),*) -> i32,)*
            /// Keeps the library mapped for as long as the entry points above are used.
            _library: libloading::Library,
        }

        impl Api {
            fn load(library: libloading::Library) -> std::result::Result<Api, String> {
                $(
                    // SAFETY: the type is the entry point's C prototype from cuda.h (CUDA
                    // 13.0) with CUresult read as i32, handles as pointers or integers of the
                    // same size, and the fn pointer is copied out while `library` stays
                    // loaded in the same struct for as long as the pointer is used.
                    let $field = unsafe {
                        *library
                            .get::<unsafe extern "C" fn($($arg),*) -> i32>(
                                concat!($symbol, "\0").as_bytes(),
                            )
                            .map_err(|e| format!("libcuda has no {}: {e}", $symbol))?
                    };
                )*
                Ok(Api { $($field,)* _library: library })
            }
        }
    };
}

driver_api! {
    init = "cuInit" (u32);
    device_count = "cuDeviceGetCount" (*mut i32);
    device_get = "cuDeviceGet" (*mut i32, i32);
    device_attribute = "cuDeviceGetAttribute" (*mut i32, i32, i32);
    primary_retain = "cuDevicePrimaryCtxRetain" (*mut usize, i32);
    primary_release = "cuDevicePrimaryCtxRelease_v2" (i32);
    context_push = "cuCtxPushCurrent_v2" (usize);
    context_pop = "cuCtxPopCurrent_v2" (*mut usize);
    module_load = "cuModuleLoadData" (*mut usize, *const c_void);
    module_unload = "cuModuleUnload" (usize);
    module_function = "cuModuleGetFunction" (*mut usize, usize, *const c_char);
    function_attribute = "cuFuncSetAttribute" (usize, i32, i32);
    mem_alloc = "cuMemAlloc_v2" (*mut DevicePtr, usize);
    mem_free = "cuMemFree_v2" (DevicePtr);
    host_alloc = "cuMemAllocHost_v2" (*mut *mut c_void, usize);
    host_free = "cuMemFreeHost" (*mut c_void);
    copy_to_device = "cuMemcpyHtoDAsync_v2" (DevicePtr, *const c_void, usize, usize);
    copy_to_host = "cuMemcpyDtoHAsync_v2" (*mut c_void, DevicePtr, usize, usize);
    memset_8 = "cuMemsetD8Async" (DevicePtr, u8, usize, usize);
    memset_32 = "cuMemsetD32Async" (DevicePtr, u32, usize, usize);
    launch_kernel = "cuLaunchKernel" (
        usize, u32, u32, u32, u32, u32, u32, u32, usize, *mut *mut c_void, *mut *mut c_void
    );
    event_create = "cuEventCreate" (*mut usize, u32);
    event_destroy = "cuEventDestroy_v2" (usize);
    event_record = "cuEventRecord" (usize, usize);
    event_synchronize = "cuEventSynchronize" (usize);
    stream_wait_event = "cuStreamWaitEvent" (usize, usize, u32);
    stream_synchronize = "cuStreamSynchronize" (usize);
    error_name = "cuGetErrorName" (i32, *mut *const c_char);
    error_string = "cuGetErrorString" (i32, *mut *const c_char);
}

static DRIVER: OnceLock<std::result::Result<Api, String>> = OnceLock::new();

/// The driver, loaded and initialised on first use; an error says why CUDA is unavailable.
pub(crate) fn driver() -> Result<&'static Api> {
    let loaded = DRIVER.get_or_init(|| {
        // SAFETY: loading libcuda runs its initialisers, which have no preconditions; the
        // library is NVIDIA's driver (or a stub with the same entry points).
        let library = unsafe { libloading::Library::new("libcuda.so.1") }
            .map_err(|e| format!("the cuda driver (libcuda.so.1) could not be loaded: {e}"))?;
        let api = Api::load(library)?;
        // SAFETY: cuInit takes flags by value; 0 is the only valid value.
        let code = unsafe { (api.init)(0) };
        if code != SUCCESS {
            return Err(format!("cuInit failed: {}", api.describe(code)));
        }
        Ok(api)
    });
    loaded.as_ref().map_err(|reason| Error::Unsupported(format!("cuda is not available: {reason}")))
}

impl Api {
    /// "NAME (code): description" for a driver result.
    fn describe(&self, code: i32) -> String {
        let text = |get: unsafe extern "C" fn(i32, *mut *const c_char) -> i32| {
            let mut out: *const c_char = std::ptr::null();
            // SAFETY: the driver writes a pointer to a static NUL-terminated string, or
            // leaves it NULL and returns an error for an unknown code.
            let ok = unsafe { get(code, &mut out) } == SUCCESS && !out.is_null();
            // SAFETY: checked non-NULL; the driver's strings are static.
            ok.then(|| unsafe { CStr::from_ptr(out) }.to_string_lossy().into_owned())
        };
        let name = text(self.error_name).unwrap_or_else(|| "CUDA_ERROR_UNRECOGNISED".into());
        let description = text(self.error_string).unwrap_or_else(|| "no description".into());
        format!("{name} ({code}): {description}")
    }

    fn check(&self, code: i32, context: &'static str) -> Result<()> {
        if code == SUCCESS {
            return Ok(());
        }
        Err(Error::Cuda { context, message: self.describe(code) })
    }

    /// Number of CUDA devices.
    pub(crate) fn device_count(&self) -> Result<i32> {
        let mut count = 0;
        // SAFETY: writes one int.
        self.check(unsafe { (self.device_count)(&mut count) }, "cuDeviceGetCount")?;
        Ok(count)
    }

    /// The device handle of ordinal `ordinal`.
    pub(crate) fn device(&self, ordinal: i32) -> Result<i32> {
        let mut device = 0;
        // SAFETY: writes one CUdevice (an int); an invalid ordinal is an error code.
        self.check(unsafe { (self.device_get)(&mut device, ordinal) }, "cuDeviceGet")?;
        Ok(device)
    }

    pub(crate) fn attribute(&self, device: i32, attribute: Attribute) -> Result<i32> {
        let mut value = 0;
        // SAFETY: writes one int; attribute values are cuda.h's.
        let code = unsafe { (self.device_attribute)(&mut value, attribute as i32, device) };
        self.check(code, "cuDeviceGetAttribute")?;
        Ok(value)
    }
}

/// A retained primary context of one device, released on drop.
pub(crate) struct PrimaryContext {
    api: &'static Api,
    device: i32,
    context: usize,
}

impl PrimaryContext {
    pub(crate) fn retain(api: &'static Api, device: i32) -> Result<PrimaryContext> {
        let mut context = 0usize;
        // SAFETY: writes one CUcontext; `device` came from cuDeviceGet.
        let code = unsafe { (api.primary_retain)(&mut context, device) };
        api.check(code, "cuDevicePrimaryCtxRetain")?;
        Ok(PrimaryContext { api, device, context })
    }

    /// Makes the context current on this thread until the guard drops, restoring the
    /// caller's current context then.
    pub(crate) fn enter(&self) -> Result<Current<'_>> {
        // SAFETY: the context is retained for as long as `self` lives.
        let code = unsafe { (self.api.context_push)(self.context) };
        self.api.check(code, "cuCtxPushCurrent")?;
        Ok(Current { context: self, _this_thread: std::marker::PhantomData })
    }
}

impl Drop for PrimaryContext {
    fn drop(&mut self) {
        // SAFETY: balances the retain in `PrimaryContext::retain`.
        unsafe { (self.api.primary_release)(self.device) };
    }
}

/// Proof that a context is current on this thread; not `Send`, so it is dropped (and pops)
/// on the thread that pushed.
pub(crate) struct Current<'a> {
    context: &'a PrimaryContext,
    _this_thread: std::marker::PhantomData<*const ()>,
}

impl Drop for Current<'_> {
    fn drop(&mut self) {
        let mut popped = 0usize;
        // SAFETY: pops the context this guard pushed, on the thread that pushed it.
        unsafe { (self.context.api.context_pop)(&mut popped) };
    }
}

/// A CUDA stream handle given by the caller; 0 is the legacy default stream. The library
/// never creates or destroys streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Stream(pub usize);

/// Device memory, freed on drop (with the owning context current).
pub(crate) struct DeviceBuffer {
    api: &'static Api,
    pub ptr: DevicePtr,
    pub bytes: usize,
}

impl DeviceBuffer {
    pub(crate) fn new(api: &'static Api, bytes: usize) -> Result<DeviceBuffer> {
        let mut ptr = 0;
        // SAFETY: writes one device address; a context is current (the caller holds one).
        let code = unsafe { (api.mem_alloc)(&mut ptr, bytes.max(1)) };
        api.check(code, "cuMemAlloc")?;
        Ok(DeviceBuffer { api, ptr, bytes })
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from cuMemAlloc and is freed once; work using it has finished
        // (the owner synchronises before dropping).
        unsafe { (self.api.mem_free)(self.ptr) };
    }
}

/// Page-locked host memory, for uploads that do not block the host.
pub(crate) struct PinnedBuffer {
    api: &'static Api,
    ptr: *mut u8,
    bytes: usize,
}

// SAFETY: the buffer is plain host memory owned by this value; it is only accessed through
// `&mut self` or by copies that the owner orders with an event.
unsafe impl Send for PinnedBuffer {}

impl PinnedBuffer {
    pub(crate) fn new(api: &'static Api, bytes: usize) -> Result<PinnedBuffer> {
        let mut ptr: *mut c_void = std::ptr::null_mut();
        // SAFETY: writes one host pointer to `bytes` page-locked bytes.
        let code = unsafe { (api.host_alloc)(&mut ptr, bytes.max(1)) };
        api.check(code, "cuMemAllocHost")?;
        Ok(PinnedBuffer { api, ptr: ptr.cast(), bytes })
    }

    /// Copies `data` into the buffer; the caller has waited for every copy out of it.
    pub(crate) fn fill(&mut self, data: &[u8]) -> *const c_void {
        assert!(data.len() <= self.bytes, "pinned staging buffer too small");
        // SAFETY: `ptr` has `bytes` writable bytes and no copy reads them now.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr, data.len()) };
        self.ptr.cast()
    }
}

impl Drop for PinnedBuffer {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from cuMemAllocHost and no copy reads it any more.
        unsafe { (self.api.host_free)(self.ptr.cast()) };
    }
}

/// An event for ordering work between streams and with the host.
pub(crate) struct Event {
    api: &'static Api,
    event: usize,
}

impl Event {
    pub(crate) fn new(api: &'static Api) -> Result<Event> {
        let mut event = 0usize;
        // SAFETY: writes one CUevent; the flag is cuda.h's.
        let code = unsafe { (api.event_create)(&mut event, EVENT_DISABLE_TIMING) };
        api.check(code, "cuEventCreate")?;
        Ok(Event { api, event })
    }

    /// Captures the work enqueued on `stream` so far.
    pub(crate) fn record(&self, stream: Stream) -> Result<()> {
        // SAFETY: the event is live; the stream is the caller's, valid by the API contract.
        let code = unsafe { (self.api.event_record)(self.event, stream.0) };
        self.api.check(code, "cuEventRecord")
    }

    /// Blocks until the captured work has finished.
    pub(crate) fn synchronize(&self) -> Result<()> {
        // SAFETY: the event is live.
        self.api.check(unsafe { (self.api.event_synchronize)(self.event) }, "cuEventSynchronize")
    }

    /// Makes later work on `stream` wait for the captured work.
    pub(crate) fn order_before(&self, stream: Stream) -> Result<()> {
        // SAFETY: the event is live; the stream is valid by the API contract.
        let code = unsafe { (self.api.stream_wait_event)(stream.0, self.event, 0) };
        self.api.check(code, "cuStreamWaitEvent")
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        // SAFETY: the event is destroyed once; the driver finishes any pending record.
        unsafe { (self.api.event_destroy)(self.event) };
    }
}

/// A loaded module (one fatbin), unloaded on drop with its context current.
pub(crate) struct Module {
    api: &'static Api,
    module: usize,
}

/// A kernel of a loaded module; valid while the module is loaded.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Function(usize);

impl Module {
    pub(crate) fn load(api: &'static Api, image: &[u8]) -> Result<Module> {
        let mut module = 0usize;
        // SAFETY: `image` is a complete fatbin produced by nvcc at build time; the driver
        // reads it during the call only.
        let code = unsafe { (api.module_load)(&mut module, image.as_ptr().cast()) };
        api.check(code, "cuModuleLoadData")?;
        Ok(Module { api, module })
    }

    pub(crate) fn function(&self, name: &str) -> Result<Function> {
        let name = std::ffi::CString::new(name).expect("kernel names have no NUL");
        let mut function = 0usize;
        // SAFETY: writes one CUfunction of this live module.
        let code = unsafe { (self.api.module_function)(&mut function, self.module, name.as_ptr()) };
        self.api.check(code, "cuModuleGetFunction")?;
        Ok(Function(function))
    }
}

impl Drop for Module {
    fn drop(&mut self) {
        // SAFETY: unloaded once, with the owning context current (the owner ensures it).
        unsafe { (self.api.module_unload)(self.module) };
    }
}

/// A launch shape: blocks, threads per block, dynamic shared memory in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Launch {
    pub blocks: u32,
    pub threads: u32,
    pub shared_bytes: u32,
}

impl Api {
    /// Lets `function` use up to `bytes` of dynamic shared memory.
    pub(crate) fn allow_shared(&self, function: Function, bytes: i32) -> Result<()> {
        // SAFETY: a live function and an attribute from cuda.h.
        let code = unsafe { (self.function_attribute)(function.0, FUNC_MAX_DYNAMIC_SHARED, bytes) };
        self.check(code, "cuFuncSetAttribute")
    }

    /// Enqueues `function` with one by-value parameter struct `args` on `stream`.
    ///
    /// # Safety
    /// `A` must be the `#[repr(C)]` mirror of the kernel's parameter struct, and every device
    /// address in it must be valid for what the kernel does with it until the work finishes.
    pub(crate) unsafe fn launch<A>(
        &self,
        function: Function,
        shape: Launch,
        stream: Stream,
        args: &A,
        name: &'static str,
    ) -> Result<()> {
        let mut params = [args as *const A as *mut c_void];
        // SAFETY: the caller's contract for `args`; the driver copies the parameter during the
        // call, so the borrow outlives its use.
        let code = unsafe {
            (self.launch_kernel)(
                function.0,
                shape.blocks,
                1,
                1,
                shape.threads,
                1,
                1,
                shape.shared_bytes,
                stream.0,
                params.as_mut_ptr(),
                std::ptr::null_mut(),
            )
        };
        self.check(code, name)
    }

    /// Sets `bytes` bytes at `ptr` to `value`, in stream order.
    pub(crate) fn memset_8(
        &self,
        ptr: DevicePtr,
        value: u8,
        bytes: usize,
        stream: Stream,
    ) -> Result<()> {
        // SAFETY: the caller owns `bytes` bytes of device memory at `ptr`.
        let code = unsafe { (self.memset_8)(ptr, value, bytes, stream.0) };
        self.check(code, "cuMemsetD8Async")
    }

    /// Sets `words` 32-bit words at `ptr` to `value`, in stream order.
    pub(crate) fn memset_32(
        &self,
        ptr: DevicePtr,
        value: u32,
        words: usize,
        stream: Stream,
    ) -> Result<()> {
        // SAFETY: the caller owns `words` words of device memory at `ptr`.
        let code = unsafe { (self.memset_32)(ptr, value, words, stream.0) };
        self.check(code, "cuMemsetD32Async")
    }

    /// Copies page-locked host memory to the device, in stream order, without blocking.
    ///
    /// # Safety
    /// `source` points to `bytes` bytes of page-locked memory that stay unchanged until the
    /// copy has finished, and the device range is owned by the caller.
    pub(crate) unsafe fn copy_to_device(
        &self,
        destination: DevicePtr,
        source: *const c_void,
        bytes: usize,
        stream: Stream,
    ) -> Result<()> {
        // SAFETY: the caller's contract.
        let code = unsafe { (self.copy_to_device)(destination, source, bytes, stream.0) };
        self.check(code, "cuMemcpyHtoDAsync")
    }

    /// Copies device memory into `out` after the work enqueued on `stream`, and waits for it.
    pub(crate) fn copy_to_host(
        &self,
        out: &mut [u8],
        source: DevicePtr,
        stream: Stream,
    ) -> Result<()> {
        // SAFETY: `out` is writable for its length and the device range is the caller's.
        let code =
            unsafe { (self.copy_to_host)(out.as_mut_ptr().cast(), source, out.len(), stream.0) };
        self.check(code, "cuMemcpyDtoHAsync")?;
        // SAFETY: the stream is valid by the API contract.
        self.check(unsafe { (self.stream_synchronize)(stream.0) }, "cuStreamSynchronize")
    }
}
