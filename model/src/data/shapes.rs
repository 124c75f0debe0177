//! `shapes`: the embedded default data. Procedural RGB images of one or two coloured shapes on a
//! textured, low-saturation background, with captions that name colours, shapes and, for two
//! shapes, their spatial relation ("a red circle left of a blue square"). Sample i of a split is a
//! pure function of (seed, split, i): no files, the same data on every machine.
//!
//! Evaluation (`Split::Eval`, a stream the training split never draws from): even indices hold one
//! shape (zero-shot classes are "colour shape", 8 × 5 = 40 classes, chance 2.5%), odd indices two
//! shapes (retrieval and the compositionality test, which scores a caption against its hard
//! negatives: colours swapped, relation flipped, a colour or a shape replaced).

use clip_pgs_kernels::philox::Philox;
use image::{Rgb, RgbImage};

use super::{Classes, Sample, Source, Split};

pub const COLOURS: [(&str, [u8; 3]); 8] = [
    ("red", [220, 30, 30]),
    ("green", [30, 170, 40]),
    ("blue", [30, 60, 220]),
    ("yellow", [235, 215, 30]),
    ("purple", [140, 40, 180]),
    ("orange", [245, 130, 20]),
    ("white", [250, 250, 250]),
    ("black", [15, 15, 15]),
];
pub const SHAPES: [&str; 5] = ["circle", "square", "triangle", "cross", "diamond"];
/// (caption word, second object offset (dx, dy) in units of the spacing): "A left of B" puts B right.
pub const RELATIONS: [(&str, (i32, i32)); 4] =
    [("left of", (1, 0)), ("right of", (-1, 0)), ("above", (0, 1)), ("below", (0, -1))];
const SINGLE_TEMPLATES: [&str; 4] =
    ["a {}.", "a photo of a {}.", "a {} on a textured background.", "a picture of a {}."];
/// Samples per training epoch; the generator could give any number, this fixes what "an epoch" is.
pub const TRAIN_LEN: usize = 12_000;
pub const EVAL_LEN: usize = 2_000;

/// One object: colour and shape indices.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Object {
    pub colour: usize,
    pub shape: usize,
}

impl Object {
    pub fn name(&self) -> String {
        format!("{} {}", COLOURS[self.colour].0, SHAPES[self.shape])
    }
}

/// What an image shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scene {
    One(Object),
    /// `first` relation `second`, e.g. red circle left of blue square.
    Two {
        first: Object,
        relation: usize,
        second: Object,
    },
}

impl Scene {
    /// The plain caption (the compositionality test scores this one against its negatives).
    pub fn caption(&self) -> String {
        match *self {
            Scene::One(o) => format!("a {}.", o.name()),
            Scene::Two { first, relation, second } => {
                format!("a {} {} a {}.", first.name(), RELATIONS[relation].0, second.name())
            }
        }
    }

    /// Zero-shot class index of a one-shape scene: colour · |shapes| + shape.
    pub fn class(&self) -> Option<usize> {
        match *self {
            Scene::One(o) => Some(o.colour * SHAPES.len() + o.shape),
            Scene::Two { .. } => None,
        }
    }

    /// SugarCrepe-style hard negatives of a two-shape scene: swap the colours, flip the relation,
    /// replace one colour, replace one shape. Each differs from the truth in one composition.
    pub fn hard_negatives(&self) -> Vec<(&'static str, String)> {
        let Scene::Two { first, relation, second } = *self else { return Vec::new() };
        let scene = |first, relation, second| Scene::Two { first, relation, second }.caption();
        let mut out = Vec::new();
        if first.colour != second.colour {
            let (a, b) = (Object { colour: second.colour, ..first }, Object { colour: first.colour, ..second });
            out.push(("swap colours", scene(a, relation, b)));
        }
        out.push(("flip relation", scene(first, relation ^ 1, second)));
        let other_colour = (first.colour + 1 + (second.colour % 7)) % COLOURS.len();
        if other_colour != first.colour {
            out.push(("replace colour", scene(Object { colour: other_colour, ..first }, relation, second)));
        }
        let other_shape = (second.shape + 1 + first.shape % 4) % SHAPES.len();
        if other_shape != second.shape {
            out.push(("replace shape", scene(first, relation, Object { shape: other_shape, ..second })));
        }
        out
    }
}

pub struct Shapes {
    split: Split,
    seed: u64,
    size: u32,
    classes: Classes,
}

impl Shapes {
    pub fn new(split: Split, seed: u64) -> Self {
        let names = (0..COLOURS.len() * SHAPES.len())
            .map(|c| Object { colour: c / SHAPES.len(), shape: c % SHAPES.len() }.name())
            .collect();
        let templates = SINGLE_TEMPLATES.iter().map(|t| t.to_string()).collect();
        Shapes { split, seed, size: 64, classes: Classes { names, templates } }
    }

    fn rng(&self, i: usize) -> Draws {
        // The split is part of the stream id: evaluation images are never training images.
        let stream = match self.split {
            Split::Train => 0x5ba9_0000,
            Split::Eval => 0x5ba9_e7a1,
        };
        Draws { rng: Philox::new(self.seed, stream, i as u32), next: 0 }
    }

    /// What sample `i` shows (drawn first from its stream, before the pixels).
    pub fn scene(&self, i: usize) -> Scene {
        self.scene_and_draws(i).0
    }

    fn scene_and_draws(&self, i: usize) -> (Scene, Draws) {
        let mut d = self.rng(i);
        let object = |d: &mut Draws| Object { colour: d.below(COLOURS.len()), shape: d.below(SHAPES.len()) };
        let two = match self.split {
            Split::Train => d.uniform() < 0.5,
            Split::Eval => i % 2 == 1,
        };
        let scene = if two {
            let first = object(&mut d);
            let mut second = object(&mut d);
            if second == first {
                second.shape = (second.shape + 1) % SHAPES.len();
            }
            Scene::Two { first, relation: d.below(RELATIONS.len()), second }
        } else {
            Scene::One(object(&mut d))
        };
        (scene, d)
    }

    /// Renders sample `i`.
    pub fn render(&self, i: usize) -> (Scene, RgbImage) {
        let (scene, mut d) = self.scene_and_draws(i);
        let s = self.size as f32;
        let mut image = background(&mut d, self.size);
        match scene {
            Scene::One(o) => {
                let r = s * (0.18 + 0.1 * d.uniform());
                let (cx, cy) = (s / 2.0 + (d.uniform() - 0.5) * s * 0.3, s / 2.0 + (d.uniform() - 0.5) * s * 0.3);
                draw(&mut image, o, cx, cy, r);
            }
            Scene::Two { first, relation, second } => {
                let r = s * (0.12 + 0.05 * d.uniform());
                let (dx, dy) = RELATIONS[relation].1;
                let spacing = s * 0.27;
                let (cx, cy) = (s / 2.0 + (d.uniform() - 0.5) * s * 0.1, s / 2.0 + (d.uniform() - 0.5) * s * 0.1);
                let (hx, hy) = (dx as f32 * spacing, dy as f32 * spacing);
                draw(&mut image, first, cx - hx, cy - hy, r);
                draw(&mut image, second, cx + hx, cy + hy, r);
            }
        }
        (scene, image)
    }
}

impl Source for Shapes {
    fn describe(&self) -> String {
        let split = if self.split == Split::Train { "train" } else { "held-out" };
        format!("shapes ({split}, {} samples, {}×{} px, seed {})", self.len(), self.size, self.size, self.seed)
    }

    fn len(&self) -> usize {
        if self.split == Split::Train { TRAIN_LEN } else { EVAL_LEN }
    }

    fn get(&self, i: usize) -> Result<Sample, String> {
        let (scene, image) = self.render(i);
        let caption = match scene {
            Scene::One(o) => SINGLE_TEMPLATES[i % SINGLE_TEMPLATES.len()].replace("{}", &o.name()),
            Scene::Two { .. } => scene.caption(),
        };
        Ok(Sample { image, caption, label: scene.class() })
    }

    fn classes(&self) -> Option<&Classes> {
        Some(&self.classes)
    }

    fn hard_negatives(&self, i: usize) -> Vec<(&'static str, String)> {
        self.scene(i).hard_negatives()
    }
}

/// Sequential draws from one Philox stream.
struct Draws {
    rng: Philox,
    next: u32,
}

impl Draws {
    fn uniform(&mut self) -> f32 {
        self.next += 1;
        self.rng.uniform(self.next - 1)
    }

    fn below(&mut self, n: usize) -> usize {
        ((self.uniform() * n as f32) as usize).min(n - 1)
    }
}

/// A grey-ish base colour with one of three textures (noise, stripes, checks) at low contrast,
/// so that shapes are the salient, high-edge objects (what PGS's edge map should keep).
fn background(d: &mut Draws, size: u32) -> RgbImage {
    let base: Vec<f32> = (0..3).map(|_| 90.0 + 60.0 * d.uniform()).collect();
    let grey = base.iter().sum::<f32>() / 3.0;
    let base: Vec<f32> = base.iter().map(|c| 0.6 * grey + 0.4 * c).collect();
    let texture = d.below(3);
    let period = 3.0 + 6.0 * d.uniform();
    let amplitude = 12.0 + 14.0 * d.uniform();
    let noise = Philox::new(d.rng.bits(d.next) as u64, 0x7e47, 0);
    d.next += 1;
    RgbImage::from_fn(size, size, |x, y| {
        let t = match texture {
            0 => noise.uniform(y * size + x) - 0.5,
            1 => ((x as f32 + y as f32) / period).sin() * 0.5,
            _ => {
                if ((x as f32 / period) as u32 + (y as f32 / period) as u32).is_multiple_of(2) {
                    0.5
                } else {
                    -0.5
                }
            }
        };
        Rgb(std::array::from_fn(|c| (base[c] + amplitude * t).clamp(0.0, 255.0) as u8))
    })
}

/// Fills shape `o` of radius `r` centred at (cx, cy).
fn draw(image: &mut RgbImage, o: Object, cx: f32, cy: f32, r: f32) {
    let colour = Rgb(COLOURS[o.colour].1);
    let (w, h) = image.dimensions();
    for y in 0..h {
        for x in 0..w {
            let (dx, dy) = ((x as f32 + 0.5 - cx) / r, (y as f32 + 0.5 - cy) / r);
            let inside = match SHAPES[o.shape] {
                "circle" => dx * dx + dy * dy <= 1.0,
                "square" => dx.abs() <= 0.85 && dy.abs() <= 0.85,
                // Apex up, base at dy = 0.8: |dx| shrinks linearly to the apex at dy = −1.
                "triangle" => (-1.0..=0.8).contains(&dy) && dx.abs() <= (dy + 1.0) / 1.8,
                "cross" => (dx.abs() <= 0.3 && dy.abs() <= 1.0) || (dy.abs() <= 0.3 && dx.abs() <= 1.0),
                _ => dx.abs() + dy.abs() <= 1.0,
            };
            if inside {
                image.put_pixel(x, y, colour);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_are_deterministic_and_splits_differ() {
        let (a, b) = (Shapes::new(Split::Train, 3), Shapes::new(Split::Train, 3));
        let held_out = Shapes::new(Split::Eval, 3);
        for i in 0..20 {
            let (x, y) = (a.get(i).unwrap(), b.get(i).unwrap());
            assert_eq!(x.image, y.image);
            assert_eq!(x.caption, y.caption);
            assert_ne!(x.image, held_out.get(i).unwrap().image, "sample {i} is in both splits");
        }
        assert_ne!(a.get(0).unwrap().image, Shapes::new(Split::Train, 4).get(0).unwrap().image);
    }

    #[test]
    fn captions_name_what_is_drawn() {
        let s = Shapes::new(Split::Eval, 0);
        // Even held-out samples hold one shape: its colour fills the image centre region.
        let sample = s.get(0).unwrap();
        let Scene::One(o) = s.scene(0) else { panic!("even held-out samples hold one shape") };
        assert!(sample.caption.contains(&o.name()), "{}", sample.caption);
        assert_eq!(sample.label, Some(o.colour * SHAPES.len() + o.shape));
        let colour = COLOURS[o.colour].1;
        let painted = sample.image.pixels().filter(|p| p.0 == colour).count();
        assert!(painted > 200, "only {painted} pixels of {} for {}", COLOURS[o.colour].0, o.name());
        let Scene::Two { first, relation, second } = s.scene(1) else { panic!("odd held-out samples hold two") };
        let caption = s.get(1).unwrap().caption;
        assert!(caption.contains(RELATIONS[relation].0) && caption.contains(&first.name()));
        assert!(caption.contains(&second.name()));
    }

    #[test]
    fn relations_place_the_objects() {
        // "A left of B": A's pixels lie left of B's.
        let s = Shapes::new(Split::Eval, 1);
        let mut checked = 0;
        for i in (1..200).step_by(2) {
            let (Scene::Two { first, relation, second }, image) = s.render(i) else { unreachable!() };
            if first.colour == second.colour {
                continue;
            }
            let centre = |c: usize| {
                let px: Vec<(u32, u32)> =
                    image.enumerate_pixels().filter(|(_, _, p)| p.0 == COLOURS[c].1).map(|(x, y, _)| (x, y)).collect();
                let n = px.len().max(1) as f32;
                (px.iter().map(|p| p.0 as f32).sum::<f32>() / n, px.iter().map(|p| p.1 as f32).sum::<f32>() / n)
            };
            let (a, b) = (centre(first.colour), centre(second.colour));
            let ok = match RELATIONS[relation].0 {
                "left of" => a.0 < b.0,
                "right of" => a.0 > b.0,
                "above" => a.1 < b.1,
                _ => a.1 > b.1,
            };
            assert!(ok, "sample {i}: {} but centres {a:?} {b:?}", s.scene(i).caption());
            checked += 1;
        }
        assert!(checked > 50);
    }

    #[test]
    fn hard_negatives_differ_from_the_caption() {
        let s = Shapes::new(Split::Eval, 0);
        for i in (1..400).step_by(2) {
            let scene = s.scene(i);
            let negatives = scene.hard_negatives();
            assert!(negatives.len() >= 2);
            for (_, n) in negatives {
                assert_ne!(n, scene.caption());
            }
        }
    }
}
