// The code the README and docs/autodiff.md show is the code that builds: a block marked
// `<!-- quoted from PATH -->` must appear in PATH, and the README's "Autodiff in one screen"
// is quoted from this file, where it compiles and its numbers are checked.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <sstream>
#include <string>
#include <vector>

// The README's snippet starts with these lines, so they are quoted from here as they stand.
#include "autodiff/ops.h"
#include "autodiff/value_and_grad.h"
#include "tensor/random.h"
using namespace mmdit;

#include "tests/test_util.h"

namespace {

using mmdit::test::read_source;

std::vector<std::string> lines_of(const std::string& text) {
  std::vector<std::string> lines;
  std::istringstream in(text);
  for (std::string line; std::getline(in, line);) lines.push_back(line);
  return lines;
}

// Whitespace runs collapsed and ends trimmed: alignment and indentation may differ.
std::string normalized(const std::string& line) {
  std::string out;
  for (char c : line) {
    if (c == ' ' || c == '\t') {
      if (!out.empty() && out.back() != ' ') out += ' ';
    } else {
      out += c;
    }
  }
  while (!out.empty() && out.back() == ' ') out.pop_back();
  return out;
}

struct Quote {
  std::string path;  // the file quoted
  int line;          // in the doc, of the opening fence
  std::vector<std::string> code;
};

// Every ```cpp block of `doc`, with the file named by the marker line above it ("" if none).
std::vector<Quote> cpp_blocks(const std::string& doc) {
  const std::vector<std::string> lines = lines_of(read_source(doc));
  const std::string marker = "<!-- quoted from ";
  std::vector<Quote> blocks;
  for (size_t i = 0; i < lines.size(); ++i) {
    if (lines[i] != "```cpp") continue;
    Quote q{"", static_cast<int>(i + 1), {}};
    if (i > 0 && lines[i - 1].rfind(marker, 0) == 0) {
      const std::string& m = lines[i - 1];
      q.path = m.substr(marker.size(), m.find(" -->") - marker.size());
    }
    for (++i; i < lines.size() && lines[i] != "```"; ++i) q.code.push_back(lines[i]);
    blocks.push_back(q);
  }
  return blocks;
}

// The parts of a quote between blank lines and `...` lines must each appear, as consecutive
// lines, somewhere in the quoted file: an excerpt may skip lines, never change one.
std::vector<std::string> missing_parts(const Quote& q) {
  std::vector<std::string> file;
  for (const std::string& l : lines_of(read_source(q.path))) file.push_back(normalized(l));
  std::vector<std::string> missing;
  std::vector<std::string> part;
  auto check = [&] {
    if (part.empty()) return;
    bool found = false;
    for (size_t at = 0; !found && at + part.size() <= file.size(); ++at)
      found = std::equal(part.begin(), part.end(), file.begin() + at);
    if (!found) missing.push_back(part.front());
    part.clear();
  };
  for (const std::string& l : q.code) {
    const std::string n = normalized(l);
    if (n.empty() || n == "...")
      check();
    else
      part.push_back(n);
  }
  check();
  return missing;
}

TEST(Docs, QuotedCodeIsInTheFileItQuotes) {
  int quotes = 0;
  for (const char* doc : {"README.md", "docs/autodiff.md"})
    for (const Quote& q : cpp_blocks(doc)) {
      if (q.path.empty()) continue;
      ++quotes;
      for (const std::string& part : missing_parts(q))
        ADD_FAILURE() << doc << ":" << q.line << ": the part starting `" << part << "` is not in "
                      << q.path;
    }
  EXPECT_GE(quotes, 19);  // the markers the two docs had when this test was written
}

// The tutorial shows only real code: every block says where it comes from.
TEST(Docs, EveryCodeBlockOfTheTutorialIsAQuote) {
  for (const Quote& q : cpp_blocks("docs/autodiff.md"))
    EXPECT_NE(q.path, "") << "docs/autodiff.md:" << q.line << " has no <!-- quoted from --> line";
}

TEST(Docs, TheCheckerFindsAChangedLine) {
  Quote q{"autodiff/tape.cc",
          0,
          {"Tape::Tape() : id_(g_next_tape_id++), previous_(g_active) {", "...",
           "  g_active = this;", "}", "...", "  g_active = nullptr;"}};
  EXPECT_THAT(missing_parts(q), testing::ElementsAre("g_active = nullptr;"));
}

// README, "Autodiff in one screen": the code is quoted from here; the checks are not.
TEST(ReadmeAutodiffInOneScreen, ValueAndGradAndTheTape) {
  Rng rng(0);
  Tensor x = rng.normal({8, 1}), y = rng.normal({8, 64});
  NamedTensors params;  // or any nn::Module
  params.insert("w", rng.normal({1, 64}));
  auto loss_fn = [](const NamedTensors& p, const Tensor& x, const Tensor& y) {
    return mean(square(tanh(matmul(x, p.at("w"))) - y));
  };
  auto [loss, grads] = value_and_grad(loss_fn)(params, x, y);  // grads.at("w") has w's shape

  // L = mean((tanh(x_i w_j) - y_ij)^2), dL/dw_j = sum_i 2 r_ij (1 - t_ij^2) x_i / 512.
  const std::vector<float> xs = x.to_vector<float>(), ys = y.to_vector<float>(),
                           w = params.at("w").to_vector<float>();
  double want_loss = 0;
  std::vector<double> want_grad(64, 0.0);
  for (int i = 0; i < 8; ++i)
    for (int j = 0; j < 64; ++j) {
      const double t = std::tanh(double{xs[i]} * w[j]), r = t - ys[i * 64 + j];
      want_loss += r * r / 512;
      want_grad[j] += 2 * r * (1 - t * t) * xs[i] / 512;
    }
  EXPECT_NEAR(loss.item(), want_loss, 1e-6 * want_loss);
  ASSERT_EQ(grads.at("w").shape(), (Shape{1, 64}));
  const std::vector<float> g = grads.at("w").to_vector<float>();
  for (int j = 0; j < 64; ++j) EXPECT_NEAR(g[j], want_grad[j], 1e-6) << j;

  {
    Tape tape;
    tape.watch(x);
    Tensor y = sin(x) * x;
    std::vector<Tensor> g = tape.gradient(y, {x}, /*cotangent=*/ones(y.shape(), y.dtype()));

    // d(x sin x)/dx = sin x + x cos x
    const std::vector<float> got = g[0].to_vector<float>();
    for (int i = 0; i < 8; ++i)
      EXPECT_NEAR(got[i], std::sin(xs[i]) + xs[i] * std::cos(xs[i]), 1e-6) << i;
  }
}

}  // namespace
