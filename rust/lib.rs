//! `ckpt._core`: the native module. Exports and `__version__` only; the
//! binding code lives in `py/`, the engine in `engine/`.

mod py;

use pyo3::prelude::*;

#[pymodule]
mod _core {
    #[pymodule_export]
    use crate::py::functions::{
        chunk_bases, commit_file, delete_objects, list_objects, probe_chunks, restore_chunks,
        save_chunks, verify_chunks,
    };

    #[pymodule_init]
    fn init(m: &pyo3::Bound<'_, pyo3::types::PyModule>) -> pyo3::PyResult<()> {
        use pyo3::types::PyModuleMethods;
        m.add("__version__", env!("CARGO_PKG_VERSION"))?;
        // The engine's named fault points (tests switch them on with CKPT_FAULT).
        let points = pyo3::types::PyTuple::new(m.py(), ckpt_engine::FAULT_POINTS)?;
        m.add("FAULT_POINTS", points)?;
        Ok(())
    }
}
