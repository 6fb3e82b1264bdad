//! The determinant-sign floor of ELRA (`det exp(G) > 0`) in the App. G.1 linear settings as the
//! runner builds them: `cargo run --release --example det_sign_floor -- [SEED]`.

use elra_lab::experiment::{linear_setting_models, Opts};
use elra_lab::prop3::det_sign_floor;
use elra_lab::runner::{setting_id, settings_of_group};

#[allow(dead_code)] // each example uses a subset of the shared parsers
mod common;
use common::positional;

fn main() -> elra::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let seed = positional(&args, 0, "SEED", 0)?;
    let opts = Opts {
        seed,
        ..Opts::default()
    };
    for s in settings_of_group("linear")? {
        let (frozen, target) = linear_setting_models(&s, &opts)?;
        let p = frozen.product()?;
        let t = target.product()?;
        let floor = det_sign_floor(&p, &t)?;
        println!(
            "{}: det(frozen product) = {:.3e}, det(target) = {:.3e}, ELRA population-MSE floor σ_min(T)²/D = {:.3e}",
            setting_id(&s),
            p.clone().lu().determinant(),
            t.clone().lu().determinant(),
            floor
        );
    }
    Ok(())
}
