use multiprocess::*;
fn sq(x: i64) -> i64 {
    x * x
}
fn main() -> Result<()> {
    let pool = Pool::builder()
        .processes(2)
        .start_method(StartMethod::Fork)
        .build()?;
    let _ = pool.map(sq, 0..1000)?;
    for _ in 0..10 {
        let t = std::time::Instant::now();
        let v = pool.map(sq, 0..1_000_000i64)?;
        println!("map 1M: {:?} ({} items)", t.elapsed(), v.len());
    }
    Ok(())
}
