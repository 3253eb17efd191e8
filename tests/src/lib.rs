pub mod guest;

pub fn placeholder() {}
