using System.Security.Cryptography;
using System.Text;
using DmaBroker.Core.Access;

namespace DmaBroker.Core.Tests;

/// <summary>The auth file of SPEC §12: patterns, first match, bearer tokens, groups and quotas.</summary>
public sealed class AccessPolicyTests
{
    private const string CiToken = "s3cret-ci-token";

    private static string Sha256Hex(string token) => Convert.ToHexStringLower(SHA256.HashData(Encoding.UTF8.GetBytes(token)));

    private static readonly string SpecExample = $$"""
        {
          // the example of SPEC §12, with a real hash
          "principals": [
            { "name": "token:ci-runner", "token_sha256": "{{Sha256Hex(CiToken)}}", "roles": ["user"],
              "groups": ["0000:08:*", 15], "quotas": { "sessions": 4, "memory_mb": 64 } },
            { "name": "cert:ops", "roles": ["admin"] },
            { "name": "uid:*", "roles": ["user"] },
            { "name": "anonymous", "roles": ["viewer"] },
          ]
        }
        """;

    [Theory]
    [InlineData("uid:*", "uid:1000", true)]
    [InlineData("uid:*", "uid:", true)]
    [InlineData("uid:*", "cert:uid:1", false)]
    [InlineData("cert:ops", "cert:ops", true)]
    [InlineData("cert:ops", "cert:ops2", false)]
    [InlineData("cert:*-ci", "cert:team-a-ci", true)]
    [InlineData("cert:*-ci", "cert:team-a-ci-old", false)]
    [InlineData("*", "anonymous", true)]
    [InlineData("token:a*b*c", "token:aXXbYYc", true)]
    [InlineData("token:a*b*c", "token:aXXbYY", false)]
    [InlineData("uid:10[0-9]", "uid:10[0-9]", true)] // names know only '*': brackets are literal
    public void MatchStar_Table(string pattern, string text, bool expected) =>
        Assert.Equal(expected, Glob.MatchStar(pattern, text));

    [Theory]
    [InlineData("0000:0[89]:*", "0000:08:00.0", true)]
    [InlineData("0000:0[89]:*", "0000:09:00.0", true)]
    [InlineData("0000:0[89]:*", "0000:0a:00.0", false)]
    [InlineData("0000:0[!89]:*", "0000:0a:00.0", true)]
    [InlineData("0000:0[a-f]:00.0", "0000:0B:00.0", true)]
    [InlineData("0000:0?:00.?", "0000:07:00.1", true)]
    [InlineData("0000:08:00.0", "0000:08:00.1", false)]
    [InlineData("*", "0000:08:00.0", true)]
    [InlineData("0000:0[8:00.0", "0000:0[8:00.0", true)] // an unclosed class is a literal '['
    public void MatchFull_Table(string pattern, string text, bool expected) =>
        Assert.Equal(expected, Glob.MatchFull(pattern, text));

    [Fact]
    public void MatchStar_ManyStars_IsNotExponential()
    {
        var pattern = string.Concat(Enumerable.Repeat("*a", 30)) + "b";
        var text = new string('a', 10_000);
        Assert.False(Glob.MatchStar(pattern, text));
    }

    [Theory]
    [InlineData("token:ci-runner", Role.User)]
    [InlineData("cert:ops", Role.Admin)]
    [InlineData("uid:1000", Role.User)]
    [InlineData("anonymous", Role.Viewer)]
    public void Resolve_FirstMatchingEntryWins(string principal, Role role)
    {
        var grant = AccessPolicy.Parse(SpecExample, Quotas.Default).Resolve(principal);
        Assert.NotNull(grant);
        Assert.Equal(principal, grant.Principal);
        Assert.Equal(role, grant.Role);
    }

    [Fact]
    public void Resolve_NoMatchingEntry_IsNull()
    {
        var policy = AccessPolicy.Parse(SpecExample, Quotas.Default);
        Assert.Null(policy.Resolve("cert:stranger"));
        Assert.Null(policy.Resolve("token:unknown"));
    }

    [Fact]
    public void Resolve_EarlierPatternShadowsLaterName()
    {
        var policy = AccessPolicy.Parse("""{"principals":[{"name":"uid:*","roles":["viewer"]},{"name":"uid:0","roles":["admin"]}]}""", Quotas.Default);
        Assert.Equal(Role.Viewer, policy.Resolve("uid:0")!.Role);
    }

    [Fact]
    public void Grant_RolesIncludeTheOnesBelow()
    {
        var admin = new Grant("cert:ops", Role.Admin, GroupPolicy.All, Quotas.Default);
        var user = admin with { Role = Role.User };
        var none = admin with { Role = null };
        Assert.True(admin.Permits(Role.Viewer) && admin.Permits(Role.User) && admin.Permits(Role.Admin));
        Assert.True(user.Permits(Role.Viewer) && user.Permits(Role.User));
        Assert.False(user.Permits(Role.Admin));
        Assert.False(none.Permits(Role.Viewer));
    }

    [Fact]
    public void AuthenticateBearer_RightTokenOnly()
    {
        var policy = AccessPolicy.Parse(SpecExample, Quotas.Default);
        Assert.Equal("token:ci-runner", policy.AuthenticateBearer(CiToken));
        Assert.Null(policy.AuthenticateBearer(CiToken + "x"));
        Assert.Null(policy.AuthenticateBearer(""));
        Assert.Null(policy.AuthenticateBearer(Sha256Hex(CiToken))); // the hash itself is no password
    }

    [Fact]
    public void Quotas_AbsentKeysTakeTheDefaults()
    {
        var defaults = Quotas.Default with { Mappings = 1000 };
        var policy = AccessPolicy.Parse(SpecExample, defaults);
        var ci = policy.Resolve("token:ci-runner")!.Quotas;
        Assert.Equal(4, ci.Sessions);
        Assert.Equal(64UL << 20, ci.MemoryBytes);
        Assert.Equal(64, ci.Containers);
        Assert.Equal(1000, ci.Mappings);
        Assert.Equal(16, ci.DmaStreams);
        Assert.Equal(20, ci.OpensPerSecond);
        Assert.Equal(defaults, policy.Resolve("cert:ops")!.Quotas);
    }

    [Fact]
    public void Groups_IdsOrEveryDeviceMatchingAGlob()
    {
        var groups = AccessPolicy.Parse(SpecExample, Quotas.Default).Resolve("token:ci-runner")!.Groups;
        Assert.True(groups.Allows(15, [PciAddress.Parse("0000:0b:00.0")]));
        Assert.True(groups.Allows(16, [PciAddress.Parse("0000:08:00.0")]));
        Assert.False(groups.Allows(16, [PciAddress.Parse("0000:08:00.0"), PciAddress.Parse("0000:09:00.0")]));
        Assert.False(groups.Allows(16, []));
        Assert.True(AccessPolicy.Parse(SpecExample, Quotas.Default).Resolve("cert:ops")!.Groups.AllowsAll);
    }

    [Fact]
    public void Open_EveryoneIsAnonymousAdmin()
    {
        var policy = AccessPolicy.Open(Quotas.Unlimited(1 << 20, 10));
        Assert.True(policy.IsOpen);
        var grant = policy.Resolve("uid:1234")!;
        Assert.Equal(AccessPolicy.Anonymous, grant.Principal);
        Assert.Equal(Role.Admin, grant.Role);
        Assert.Null(policy.AuthenticateBearer("anything"));
    }

    [Theory]
    [InlineData("[]", "\"principals\" array")]
    [InlineData("""{"principal":[]}""", "unknown key \"principal\"")]
    [InlineData("""{"principals":[{"roles":["user"]}]}""", "\"name\" is required")]
    [InlineData("""{"principals":[{"name":"bob","roles":["user"]}]}""", "cert:<CN>, token:<name> or uid:<n>")]
    [InlineData("""{"principals":[{"name":"uid:1"}]}""", "\"roles\" is required")]
    [InlineData("""{"principals":[{"name":"uid:1","roles":["root"]}]}""", "unknown role \"root\"")]
    [InlineData("""{"principals":[{"name":"uid:1","roles":[],"token_sha256":"00"}]}""", "token:<name> entry")]
    [InlineData("""{"principals":[{"name":"token:a","roles":[],"token_sha256":"00"}]}""", "64 hex digits")]
    [InlineData("""{"principals":[{"name":"token:*","roles":[],"token_sha256":"0000000000000000000000000000000000000000000000000000000000000000"}]}""", "without wildcards")]
    [InlineData("""{"principals":[{"name":"uid:1","roles":[],"groups":[-1]}]}""", "groups holds group ids")]
    [InlineData("""{"principals":[{"name":"uid:1","roles":[],"groups":["0000:08:00.0; rm"]}]}""", "groups holds group ids")]
    [InlineData("""{"principals":[{"name":"uid:1","roles":[],"quotas":{"sessions":-1}}]}""", "sessions must be a whole number")]
    [InlineData("""{"principals":[{"name":"uid:1","roles":[],"quotas":{"memory":1}}]}""", "unknown key \"memory\"")]
    [InlineData("""{"principals":[{"name":"uid:1","roles":[]}""", "not valid JSON")]
    public void Parse_BadFile_SaysWhatAndWhere(string json, string expected)
    {
        var e = Assert.Throws<AccessPolicyException>(() => AccessPolicy.Parse(json, Quotas.Default, "auth.json"));
        Assert.StartsWith("auth.json", e.Message, StringComparison.Ordinal);
        Assert.Contains(expected, e.Message, StringComparison.Ordinal);
    }

    [Fact]
    public void Parse_BadEntry_NeverEchoesAToken()
    {
        var hash = Sha256Hex(CiToken);
        var json = $$"""{"principals":[{"name":"token:ci","token_sha256":"{{hash}}","roles":["boss"]}]}""";
        var e = Assert.Throws<AccessPolicyException>(() => AccessPolicy.Parse(json, Quotas.Default));
        Assert.DoesNotContain(hash, e.Message, StringComparison.Ordinal);
    }
}

/// <summary>The commented example auth file shipped in docs/ parses and says what its comments say.</summary>
public sealed class AuthExampleFileTests
{
    [Fact]
    public void DocsExample_ParsesAsDocumented()
    {
        var root = new DirectoryInfo(AppContext.BaseDirectory);
        while (root is not null && !File.Exists(Path.Combine(root.FullName, "DmaBroker.sln")))
            root = root.Parent;
        Assert.NotNull(root);
        var policy = AccessPolicy.Load(Path.Combine(root.FullName, "docs", "auth.example.json"), Quotas.Default);
        Assert.Equal(4, policy.Count);
        Assert.Equal("token:ci-runner", policy.AuthenticateBearer("test"));
        Assert.Equal(Role.Admin, policy.Resolve("cert:ops")!.Role);
        Assert.Equal(Quotas.Default, policy.Resolve("uid:1000")!.Quotas);
        Assert.Equal(Role.Viewer, policy.Resolve("anonymous")!.Role);
        Assert.Null(policy.Resolve("cert:someone-else"));
    }
}
