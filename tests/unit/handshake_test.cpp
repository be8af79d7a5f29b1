// Option negotiation, driven option by option without a socket.
#include "proxy/negotiation/handshake.hpp"

#include <gtest/gtest.h>

#include "proxy/wire/codec.hpp"

namespace bscache::proxy {
namespace {

using namespace wire;

struct Reply {
  uint32_t option, type;
  Bytes payload;
};

// Splits a byte stream of option replies. Bytes that do not form whole
// replies are a test failure (and end the list), never a read past the end.
std::vector<Reply> replies(const Bytes& bytes) {
  std::vector<Reply> out;
  ByteReader r(bytes);
  while (r.remaining() > 0) {
    auto magic = r.u64();
    auto option = r.u32();
    auto type = r.u32();
    auto length = r.u32();
    auto payload = length ? r.string(*length) : std::nullopt;
    if (!magic || !option || !type || !length || !payload) {
      ADD_FAILURE() << "truncated option reply after " << out.size() << " whole replies";
      break;
    }
    EXPECT_EQ(*magic, kOptReplyMagic) << "reply " << out.size();
    out.push_back({*option, *type, Bytes(payload->begin(), payload->end())});
  }
  return out;
}

Bytes meta_request(const std::vector<std::string>& queries) {
  Bytes b;
  put_u32(b, 0);
  put_u32(b, static_cast<uint32_t>(queries.size()));
  for (const auto& q : queries) {
    put_u32(b, static_cast<uint32_t>(q.size()));
    put_bytes(b, q);
  }
  return b;
}

class HandshakeTest : public ::testing::Test {
 protected:
  HandshakeTest() {
    UpstreamInfo up;
    up.size = 1 << 30;
    up.can_flush = up.can_trim = up.can_zero = true;
    up.contexts = {"base:allocation", "qemu:dirty-bitmap:b1", "qemu:allocation-depth"};
    up.min_block = 512;
    up.advertises_block_size = true;
    info = make_export_info(up, false);
  }
  ExportInfo info;
};

Bytes go_request() {
  Bytes b;
  put_u32(b, 0);  // export name ""
  put_u16(b, 0);  // no info requests
  return b;
}

TEST_F(HandshakeTest, UnknownOptionIsUnsupportedAndNegotiationContinues) {
  Handshake h(info, true);
  Bytes out;
  EXPECT_EQ(h.handle(1234, {}, out), OptionOutcome::Continue);
  auto r = replies(out);
  ASSERT_EQ(r.size(), 1u);
  EXPECT_EQ(r[0].option, 1234u);
  EXPECT_EQ(r[0].type, kRepErrUnsup);
}

TEST_F(HandshakeTest, StartTlsIsRefusedByPolicy) {
  Handshake h(info, true);
  Bytes out;
  EXPECT_EQ(h.handle(kOptStartTls, {}, out), OptionOutcome::Continue);
  auto r = replies(out);
  ASSERT_EQ(r.size(), 1u);
  EXPECT_EQ(r[0].type, kRepErrPolicy);
}

// ---- Extended headers ------------------------------------------------------

TEST_F(HandshakeTest, ExtendedHeadersAreAcknowledgedAndImplyStructuredReplies) {
  Handshake h(info, true);
  Bytes out;
  EXPECT_EQ(h.handle(kOptExtendedHeaders, {}, out), OptionOutcome::Continue);
  auto r = replies(out);
  ASSERT_EQ(r.size(), 1u);
  EXPECT_EQ(r[0].option, uint32_t{kOptExtendedHeaders});
  EXPECT_EQ(r[0].type, kRepAck);
  EXPECT_TRUE(h.negotiated().extended_headers);
  EXPECT_TRUE(h.negotiated().structured_replies);
  // SET_META_CONTEXT needs no STRUCTURED_REPLY after them.
  out.clear();
  h.handle(kOptSetMetaContext, meta_request({"base:allocation"}), out);
  EXPECT_EQ(replies(out).back().type, kRepAck);
  EXPECT_EQ(h.negotiated().contexts, (std::vector<uint32_t>{0}));
}

TEST_F(HandshakeTest, ExtendedHeadersWithAPayloadOrTwiceAreInvalid) {
  Handshake h(info, true);
  Bytes out;
  const Bytes junk{1, 2, 3, 4};
  h.handle(kOptExtendedHeaders, junk, out);
  EXPECT_FALSE(h.negotiated().extended_headers);
  h.handle(kOptExtendedHeaders, {}, out);
  h.handle(kOptExtendedHeaders, {}, out);
  auto r = replies(out);
  ASSERT_EQ(r.size(), 3u);
  EXPECT_EQ(r[0].type, kRepErrInvalid);
  EXPECT_EQ(r[1].type, kRepAck);
  EXPECT_EQ(r[2].type, kRepErrInvalid);
  EXPECT_TRUE(h.negotiated().extended_headers);
}

TEST_F(HandshakeTest, StructuredReplyAfterExtendedHeadersIsExtHeaderReqd) {
  Handshake h(info, true);
  Bytes out;
  h.handle(kOptStructuredReply, {}, out);  // before: allowed, and extended headers still may follow
  h.handle(kOptExtendedHeaders, {}, out);
  h.handle(kOptStructuredReply, {}, out);
  auto r = replies(out);
  ASSERT_EQ(r.size(), 3u);
  EXPECT_EQ(r[0].type, kRepAck);
  EXPECT_EQ(r[1].type, kRepAck);
  EXPECT_EQ(r[2].type, kRepErrExtHeaderReqd);
  EXPECT_TRUE(h.negotiated().extended_headers);
}

TEST_F(HandshakeTest, ExportNameAfterExtendedHeadersCloses) {
  Handshake h(info, true);
  Bytes out;
  h.handle(kOptExtendedHeaders, {}, out);
  out.clear();
  EXPECT_EQ(h.handle(kOptExportName, {}, out), OptionOutcome::Close);
  EXPECT_TRUE(out.empty()) << "EXPORT_NAME has no error reply";
}

TEST_F(HandshakeTest, TlsForgetsExtendedHeaders) {
  Handshake h(info, true, TlsMode::On);
  Bytes out;
  h.handle(kOptExtendedHeaders, {}, out);
  EXPECT_EQ(h.handle(kOptStartTls, {}, out), OptionOutcome::StartTls);
  h.tls_started();
  EXPECT_FALSE(h.negotiated().extended_headers);
  EXPECT_FALSE(h.negotiated().structured_replies);
}

TEST_F(HandshakeTest, RequireRefusesExtendedHeadersBeforeTls) {
  Handshake h(info, true, TlsMode::Require);
  Bytes out;
  h.handle(kOptExtendedHeaders, {}, out);
  EXPECT_EQ(replies(out)[0].type, kRepErrTlsReqd);
  EXPECT_FALSE(h.negotiated().extended_headers);
}

// NBD_FLAG_BLOCK_STATUS_PAYLOAD: only with extended headers and selected contexts.
TEST_F(HandshakeTest, BlockStatusPayloadIsOfferedOnlyWithExtendedHeadersAndContexts) {
  const auto go_flags = [](Handshake& h) {
    Bytes out;
    EXPECT_EQ(h.handle(kOptGo, go_request(), out), OptionOutcome::Transmission);
    const auto r = replies(out);
    ByteReader exp(r[0].payload);
    exp.u16();
    exp.u64();
    return *exp.u16();
  };
  Bytes out;
  Handshake structured(info, true);
  structured.handle(kOptStructuredReply, {}, out);
  structured.handle(kOptSetMetaContext, meta_request({"base:allocation"}), out);
  EXPECT_FALSE(go_flags(structured) & kTxBlockStatusPayload);

  Handshake no_contexts(info, true);
  no_contexts.handle(kOptExtendedHeaders, {}, out);
  EXPECT_FALSE(go_flags(no_contexts) & kTxBlockStatusPayload);

  Handshake extended(info, true);
  extended.handle(kOptExtendedHeaders, {}, out);
  extended.handle(kOptSetMetaContext, meta_request({"base:allocation", "qemu:allocation-depth"}), out);
  EXPECT_TRUE(go_flags(extended) & kTxBlockStatusPayload);
  const TransmissionLimits limits = transmission_limits(info, extended.negotiated());
  EXPECT_TRUE(limits.extended_headers);
  EXPECT_TRUE(limits.tx_flags & kTxBlockStatusPayload);
}

TEST_F(HandshakeTest, SetMetaContextNeedsStructuredRepliesFirst) {
  Handshake h(info, true);
  Bytes out;
  Bytes request = meta_request({"base:allocation"});
  h.handle(kOptSetMetaContext, request, out);
  auto r = replies(out);
  ASSERT_EQ(r.size(), 1u);
  EXPECT_EQ(r[0].type, kRepErrInvalid);
  EXPECT_TRUE(h.negotiated().contexts.empty());
}

TEST_F(HandshakeTest, SetMetaContextSelectsExactNamesWithIds) {
  Handshake h(info, true);
  Bytes out;
  h.handle(kOptStructuredReply, {}, out);
  out.clear();
  Bytes request = meta_request({"qemu:allocation-depth", "base:allocation", "nonsense:x"});
  h.handle(kOptSetMetaContext, request, out);
  auto r = replies(out);
  ASSERT_EQ(r.size(), 3u);  // two contexts, then ACK
  EXPECT_EQ(r[0].type, kRepMetaContext);
  ByteReader first(r[0].payload);
  EXPECT_EQ(first.u32(), 3u);  // qemu:allocation-depth is index 2, id 3
  EXPECT_EQ(first.string(first.remaining()), "qemu:allocation-depth");
  EXPECT_EQ(r[2].type, kRepAck);
  EXPECT_EQ(h.negotiated().contexts, (std::vector<uint32_t>{2, 0}));
}

TEST_F(HandshakeTest, ListMetaContextMatchesNamespaces) {
  Handshake h(info, true);
  Bytes out;
  Bytes request = meta_request({"qemu:"});
  h.handle(kOptListMetaContext, request, out);
  auto r = replies(out);
  ASSERT_EQ(r.size(), 3u);
  EXPECT_EQ(r[2].type, kRepAck);
  out.clear();
  Bytes all = meta_request({});
  h.handle(kOptListMetaContext, all, out);
  EXPECT_EQ(replies(out).size(), 4u);  // every context, then ACK
  EXPECT_TRUE(h.negotiated().contexts.empty()) << "LIST must not select";
}

TEST_F(HandshakeTest, GoSendsExportAndRequestedBlockSizeThenTransmission) {
  Handshake h(info, true);
  Bytes request;
  put_u32(request, 0);
  put_u16(request, 1);
  put_u16(request, kInfoBlockSize);
  Bytes out;
  EXPECT_EQ(h.handle(kOptGo, request, out), OptionOutcome::Transmission);
  auto r = replies(out);
  ASSERT_EQ(r.size(), 3u);
  ByteReader exp(r[0].payload);
  EXPECT_EQ(exp.u16(), kInfoExport);
  EXPECT_EQ(exp.u64(), uint64_t{1} << 30);
  ByteReader bs(r[1].payload);
  EXPECT_EQ(bs.u16(), kInfoBlockSize);
  EXPECT_EQ(bs.u32(), 512u);
  EXPECT_EQ(r[2].type, kRepAck);
}

TEST_F(HandshakeTest, InfoStaysInNegotiation) {
  Handshake h(info, true);
  Bytes request;
  put_u32(request, 0);
  put_u16(request, 1);
  put_u16(request, kInfoBlockSize);
  Bytes out;
  EXPECT_EQ(h.handle(kOptInfo, request, out), OptionOutcome::Continue);
  EXPECT_EQ(replies(out).back().type, kRepAck);
}

// Upstream needs 512-byte alignment (info's minimum): a client that does not
// ask for block sizes is told so by INFO, and served at minimum 1 after GO.
TEST_F(HandshakeTest, ClientsThatDoNotAskForBlockSizesGetBlockSizeReqdOrMinimumOne) {
  Handshake h(info, true);
  Bytes out;
  EXPECT_EQ(h.handle(kOptInfo, go_request(), out), OptionOutcome::Continue);
  auto r = replies(out);
  ASSERT_EQ(r.size(), 2u);
  EXPECT_EQ(ByteReader(r[0].payload).u16(), kInfoExport) << "the infos first, as qemu-nbd sends them";
  EXPECT_EQ(r[1].type, kRepErrBlockSizeReqd);

  out.clear();
  EXPECT_EQ(h.handle(kOptGo, go_request(), out), OptionOutcome::Transmission);
  r = replies(out);
  ASSERT_EQ(r.size(), 3u);
  ByteReader sizes(r[1].payload);
  EXPECT_EQ(sizes.u16(), kInfoBlockSize);
  EXPECT_EQ(sizes.u32(), 1u) << "minimum 1: bscache aligns what this client sends";
  EXPECT_EQ(r[2].type, kRepAck);
  EXPECT_FALSE(h.negotiated().block_size_agreed);
  EXPECT_EQ(transmission_limits(info, h.negotiated()).min_block, 1u);
}

TEST_F(HandshakeTest, MalformedGoIsInvalid) {
  Handshake h(info, true);
  Bytes request;
  put_u32(request, 100);  // name longer than the payload
  Bytes out;
  EXPECT_EQ(h.handle(kOptGo, request, out), OptionOutcome::Continue);
  auto r = replies(out);
  ASSERT_EQ(r.size(), 1u);
  EXPECT_EQ(r[0].type, kRepErrInvalid);
}

TEST_F(HandshakeTest, ExportNameRepliesWithZeroesUnlessNoZeroes) {
  Bytes out;
  Handshake with_zeroes(info, false);
  EXPECT_EQ(with_zeroes.handle(kOptExportName, {}, out), OptionOutcome::Transmission);
  EXPECT_EQ(out.size(), 8u + 2u + 124u);
  out.clear();
  Handshake no_zeroes(info, true);
  no_zeroes.handle(kOptExportName, {}, out);
  EXPECT_EQ(out.size(), 10u);
}

TEST_F(HandshakeTest, AbortIsAcknowledgedAndCloses) {
  Handshake h(info, true);
  Bytes out;
  EXPECT_EQ(h.handle(kOptAbort, {}, out), OptionOutcome::Close);
  auto r = replies(out);
  ASSERT_EQ(r.size(), 1u);
  EXPECT_EQ(r[0].type, kRepAck);
}

TEST_F(HandshakeTest, OversizedExportNameCloses) {
  Handshake h(info, true);
  Bytes out;
  EXPECT_EQ(h.refuse_oversized(kOptExportName, out), OptionOutcome::Close);
  EXPECT_EQ(h.refuse_oversized(kOptInfo, out), OptionOutcome::Continue);
}

// ---- STARTTLS (--tls on|require) ----

TEST_F(HandshakeTest, RequireRefusesEverythingButStartTlsAndAbortBeforeTls) {
  Handshake h(info, true, TlsMode::Require);
  Bytes out;
  const auto go = go_request();
  EXPECT_EQ(h.handle(kOptList, {}, out), OptionOutcome::Continue);
  EXPECT_EQ(h.handle(kOptInfo, go, out), OptionOutcome::Continue);
  EXPECT_EQ(h.handle(kOptGo, go, out), OptionOutcome::Continue);
  EXPECT_EQ(h.handle(kOptStructuredReply, {}, out), OptionOutcome::Continue);
  EXPECT_EQ(h.handle(kOptListMetaContext, meta_request({}), out), OptionOutcome::Continue);
  EXPECT_EQ(h.handle(4321, {}, out), OptionOutcome::Continue);
  auto r = replies(out);
  ASSERT_EQ(r.size(), 6u);
  for (const auto& reply : r) EXPECT_EQ(reply.type, kRepErrTlsReqd) << "option " << reply.option;
  EXPECT_FALSE(h.negotiated().structured_replies) << "a refused option must not change state";
  // EXPORT_NAME has no error reply: the connection closes without a byte.
  out.clear();
  EXPECT_EQ(h.handle(kOptExportName, {}, out), OptionOutcome::Close);
  EXPECT_TRUE(out.empty());
  EXPECT_EQ(Handshake(info, true, TlsMode::Require).handle(kOptAbort, {}, out), OptionOutcome::Close);
}

// An oversized option is still just an option before TLS: TLS_REQD, not TOO_BIG.
TEST_F(HandshakeTest, RequireRefusesOversizedOptionsWithTlsReqdBeforeTls) {
  Handshake h(info, true, TlsMode::Require);
  Bytes out;
  EXPECT_EQ(h.refuse_oversized(kOptInfo, out), OptionOutcome::Continue);
  EXPECT_EQ(h.refuse_oversized(4321, out), OptionOutcome::Continue);
  EXPECT_EQ(h.refuse_oversized(kOptStartTls, out), OptionOutcome::Continue);
  auto r = replies(out);
  ASSERT_EQ(r.size(), 3u);
  EXPECT_EQ(r[0].type, kRepErrTlsReqd);
  EXPECT_EQ(r[1].type, kRepErrTlsReqd);
  EXPECT_EQ(r[2].type, kRepErrTooBig) << "STARTTLS itself may not carry a payload";
  out.clear();
  EXPECT_EQ(h.refuse_oversized(kOptExportName, out), OptionOutcome::Close);
  EXPECT_TRUE(out.empty()) << "EXPORT_NAME before TLS closes without a byte";
}

TEST_F(HandshakeTest, StartTlsIsAcknowledgedOnceThenInvalid) {
  Handshake h(info, true, TlsMode::Require);
  Bytes out;
  const Bytes junk{1};
  EXPECT_EQ(h.handle(kOptStartTls, junk, out), OptionOutcome::Continue);
  EXPECT_EQ(h.handle(kOptStartTls, {}, out), OptionOutcome::StartTls);
  h.tls_started();
  EXPECT_EQ(h.handle(kOptStartTls, {}, out), OptionOutcome::Continue);
  auto r = replies(out);
  ASSERT_EQ(r.size(), 3u);
  EXPECT_EQ(r[0].type, kRepErrInvalid);  // STARTTLS takes no payload
  EXPECT_EQ(r[1].type, kRepAck);
  EXPECT_EQ(r[2].type, kRepErrInvalid);  // a second STARTTLS
  // Inside TLS everything is served.
  out.clear();
  EXPECT_EQ(h.handle(kOptGo, go_request(), out), OptionOutcome::Transmission);
}

TEST_F(HandshakeTest, TlsForgetsWhatWasNegotiatedInPlainText) {
  Handshake h(info, true, TlsMode::On);
  Bytes out;
  EXPECT_EQ(h.handle(kOptStructuredReply, {}, out), OptionOutcome::Continue);
  EXPECT_EQ(h.handle(kOptSetMetaContext, meta_request({"base:allocation"}), out), OptionOutcome::Continue);
  ASSERT_TRUE(h.negotiated().structured_replies);
  ASSERT_EQ(h.negotiated().contexts.size(), 1u);
  EXPECT_EQ(h.handle(kOptStartTls, {}, out), OptionOutcome::StartTls);
  h.tls_started();
  EXPECT_FALSE(h.negotiated().structured_replies);
  EXPECT_TRUE(h.negotiated().contexts.empty());
  EXPECT_TRUE(h.negotiated().no_zeroes) << "client flags precede every option and stay";
  // SET_META_CONTEXT now needs structured replies again, inside TLS.
  out.clear();
  EXPECT_EQ(h.handle(kOptSetMetaContext, meta_request({"base:allocation"}), out), OptionOutcome::Continue);
  auto r = replies(out);
  ASSERT_EQ(r.size(), 1u);
  EXPECT_EQ(r[0].type, kRepErrInvalid);
}

TEST_F(HandshakeTest, TlsOnStillServesPlainClients) {
  Handshake h(info, true, TlsMode::On);
  Bytes out;
  EXPECT_EQ(h.handle(kOptGo, go_request(), out), OptionOutcome::Transmission);
  EXPECT_FALSE(h.tls_active());
}

TEST(TransmissionLimitsTest, ComeFromTheExportAndTheNegotiation) {
  UpstreamInfo up;
  up.size = 1 << 30;
  up.can_fua = true;
  up.min_block = 4096;
  up.max_block = 1 << 20;
  const ExportInfo info = make_export_info(up, false);
  Handshake h(info, true);
  EXPECT_FALSE(transmission_limits(info, h.negotiated()).structured_replies);
  EXPECT_FALSE(transmission_limits(info, h.negotiated()).has_meta_contexts);
  Bytes out;
  h.handle(kOptStructuredReply, {}, out);
  Bytes request = meta_request({"base:allocation"});
  h.handle(kOptSetMetaContext, request, out);
  const TransmissionLimits limits = transmission_limits(info, h.negotiated());
  EXPECT_EQ(limits.export_size, uint64_t{1} << 30);
  EXPECT_EQ(limits.tx_flags, info.tx_flags);
  EXPECT_TRUE(limits.tx_flags & kTxSendFua);
  EXPECT_EQ(limits.min_block, 1u) << "no GO that asked for block sizes yet";
  EXPECT_EQ(limits.max_payload, 1u << 20) << "upstream's maximum block size bounds READ/WRITE";
  EXPECT_TRUE(limits.structured_replies);
  EXPECT_TRUE(limits.has_meta_contexts);
  Bytes go;
  put_u32(go, 0);
  put_u16(go, 1);
  put_u16(go, kInfoBlockSize);
  h.handle(kOptGo, go, out);
  EXPECT_EQ(transmission_limits(info, h.negotiated()).min_block, 4096u) << "agreed to in GO";
}

TEST(TransmissionLimitsTest, PayloadNeverExceedsOurOwnMaximum) {
  UpstreamInfo up;
  up.max_block = 0xffffffff;
  EXPECT_EQ(transmission_limits(make_export_info(up, false), Negotiated{}).max_payload, kMaxPayload);
}

TEST(ExportInfoTest, SynthesizesBaseAllocationWhenUpstreamLacksIt) {
  UpstreamInfo up;
  up.contexts = {"qemu:dirty-bitmap:x"};
  auto info = make_export_info(up, false);
  ASSERT_EQ(info.contexts.size(), 2u);
  EXPECT_EQ(info.contexts[static_cast<size_t>(info.base_allocation)], "base:allocation");
  EXPECT_EQ(info.upstream_index[static_cast<size_t>(info.base_allocation)], -1);
}

TEST(ExportInfoTest, ReadOnlyHidesMutatingCommands) {
  UpstreamInfo up;
  up.can_trim = up.can_zero = up.can_fast_zero = up.can_flush = true;
  auto info = make_export_info(up, true);
  EXPECT_TRUE(info.tx_flags & kTxReadOnly);
  EXPECT_FALSE(info.tx_flags & kTxSendTrim);
  EXPECT_FALSE(info.tx_flags & kTxSendWriteZeroes);
  EXPECT_TRUE(info.tx_flags & kTxSendFlush);
}

// ---- exports looked up per option (--exports passthrough) ----

Bytes named(std::string_view name, const Bytes& rest) {
  Bytes b;
  put_u32(b, static_cast<uint32_t>(name.size()));
  put_bytes(b, name);
  b.insert(b.end(), rest.begin(), rest.end());
  return b;
}
Bytes go_for(std::string_view name) {
  Bytes none;
  put_u16(none, 0);
  return named(name, none);
}
Bytes set_meta_for(std::string_view name) {
  Bytes rest;
  put_u32(rest, 1);
  put_u32(rest, 15);
  put_bytes(rest, "base:allocation");
  return named(name, rest);
}

TEST_F(HandshakeTest, OptionsNamingAnExportAskForItAndListForTheList) {
  Handshake h(true);
  EXPECT_EQ(h.needs(kOptGo, go_for("disk1")).kind, OptionNeed::Kind::Export);
  EXPECT_EQ(h.needs(kOptGo, go_for("disk1")).name, "disk1");
  EXPECT_EQ(h.needs(kOptInfo, go_for("")).kind, OptionNeed::Kind::Export);
  const std::string raw = "by-name";
  EXPECT_EQ(h.needs(kOptExportName, ByteSpan(reinterpret_cast<const uint8_t*>(raw.data()), raw.size())).name, raw);
  EXPECT_EQ(h.needs(kOptListMetaContext, meta_request({})).kind, OptionNeed::Kind::Export);
  EXPECT_EQ(h.needs(kOptList, {}).kind, OptionNeed::Kind::List);
  // Refused whatever is found: nothing to look up.
  EXPECT_EQ(h.needs(kOptSetMetaContext, set_meta_for("x")).kind, OptionNeed::Kind::Nothing);  // no structured replies
  EXPECT_EQ(h.needs(kOptGo, Bytes{1, 2}).kind, OptionNeed::Kind::Nothing);                    // malformed
  EXPECT_EQ(h.needs(kOptStructuredReply, {}).kind, OptionNeed::Kind::Nothing);
  Handshake tls(true, TlsMode::Require);
  EXPECT_EQ(tls.needs(kOptGo, go_for("disk1")).kind, OptionNeed::Kind::Nothing);
  Handshake fixed(info, true);
  EXPECT_EQ(fixed.needs(kOptGo, go_for("disk1")).kind, OptionNeed::Kind::Nothing);
}

TEST_F(HandshakeTest, ARefusedExportGetsItsErrorAndNegotiationGoesOn) {
  Handshake h(true);
  const ExportChoice refused{nullptr, kRepErrUnknown, "no such export"};
  Bytes out;
  EXPECT_EQ(h.handle(kOptGo, go_for("nope"), out, {.choice = &refused}), OptionOutcome::Continue);
  auto r = replies(out);
  ASSERT_EQ(r.size(), 1u);
  EXPECT_EQ(r[0].type, kRepErrUnknown);
  EXPECT_EQ(std::string(r[0].payload.begin(), r[0].payload.end()), "no such export");
  // EXPORT_NAME has no error reply: the connection closes, nothing sent.
  out.clear();
  const std::string raw = "nope";
  EXPECT_EQ(h.handle(kOptExportName, ByteSpan(reinterpret_cast<const uint8_t*>(raw.data()), raw.size()), out,
                     {.choice = &refused}),
            OptionOutcome::Close);
  EXPECT_TRUE(out.empty());
  // A found export is answered from its own info.
  const ExportChoice found{&info, 0, {}};
  out.clear();
  EXPECT_EQ(h.handle(kOptGo, go_for("disk1"), out, {.choice = &found}), OptionOutcome::Transmission);
  EXPECT_EQ(replies(out).back().type, kRepAck);
}

TEST_F(HandshakeTest, ListRepliesWithEveryExportAndItsDescription) {
  Handshake h(true);
  const UpstreamListing listing{{{"a.img", "first"}, {"b.img", ""}}, 0, {}};
  Bytes out;
  EXPECT_EQ(h.handle(kOptList, {}, out, {.listing = &listing}), OptionOutcome::Continue);
  auto r = replies(out);
  ASSERT_EQ(r.size(), 3u);
  EXPECT_EQ(r[0].type, kRepServer);
  ByteReader first(r[0].payload);
  EXPECT_EQ(first.u32(), 5u);
  EXPECT_EQ(first.string(5), "a.img");
  EXPECT_EQ(first.string(first.remaining()), "first");
  EXPECT_EQ(r[1].payload.size(), 4u + 5u);
  EXPECT_EQ(r[2].type, kRepAck);
}

TEST_F(HandshakeTest, ListPassesUpstreamsErrorOnAsItCame) {
  Handshake h(true);
  const UpstreamListing failed{{}, kRepErrPlatform, "listing is broken today"};
  Bytes out;
  EXPECT_EQ(h.handle(kOptList, {}, out, {.listing = &failed}), OptionOutcome::Continue);
  auto r = replies(out);
  ASSERT_EQ(r.size(), 1u) << "no SERVER replies before the error";
  EXPECT_EQ(r[0].type, kRepErrPlatform);
  EXPECT_EQ(std::string(r[0].payload.begin(), r[0].payload.end()), "listing is broken today");
}

TEST_F(HandshakeTest, ContextsSetForOneExportDoNotCarryOverToAnother) {
  const ExportChoice found{&info, 0, {}};
  for (const char* go_name : {"other", "disk1"}) {
    Handshake h(true);
    Bytes out;
    h.handle(kOptStructuredReply, {}, out);
    h.handle(kOptSetMetaContext, set_meta_for("disk1"), out, {.choice = &found});
    ASSERT_EQ(h.negotiated().contexts.size(), 1u);
    EXPECT_EQ(h.handle(kOptGo, go_for(go_name), out, {.choice = &found}), OptionOutcome::Transmission);
    EXPECT_EQ(h.negotiated().contexts.size(), std::string(go_name) == "disk1" ? 1u : 0u) << go_name;
  }
}

}  // namespace
}  // namespace bscache::proxy
