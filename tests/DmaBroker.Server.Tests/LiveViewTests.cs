using System.Net;
using System.Net.Http.Headers;
using System.Text;
using DmaBroker.Protocol.V1;
using DmaBroker.Server.LiveView;
using Microsoft.Extensions.Time.Testing;

namespace DmaBroker.Server.Tests;

/// <summary>
/// SPEC §13's live view on the --http-listen listener: <c>GET /events</c>, the Watch journal as
/// server-sent events (snapshot first, then each change with its revision as id, resumable with
/// Last-Event-ID), and <c>GET /</c>, the page, both behind the viewer role.
/// </summary>
public sealed class LiveViewTests
{
    private const uint EduGroup = 14;

    [Fact]
    public async Task Events_FirstEvent_IsSnapshotOfTheDefaultTopology()
    {
        await using var broker = await TestBroker.StartAsync();
        await using var events = await SseStream.OpenAsync(broker.WebAddress);
        Assert.Equal(HttpStatusCode.OK, events.Status);
        Assert.Equal("text/event-stream; charset=utf-8", events.ContentType);

        var snapshot = await events.NextAsync();

        Assert.Equal("snapshot", snapshot.Name);
        Assert.Equal(broker.Broker.Journal.Current.Revision, snapshot.Revision);
        var json = snapshot.Json;
        Assert.Equal(snapshot.Revision, json.GetProperty("revision").GetUInt64());
        var groups = json.GetProperty("groups").EnumerateArray().ToDictionary(g => g.GetProperty("id").GetUInt32());
        Assert.Equal(Enumerable.Range(0, 18).Select(i => (uint)i), groups.Keys);
        Assert.Equal(("KERNEL", 2), (groups[10].GetProperty("owner_kind").GetString(), groups[10].GetProperty("owner_count").GetInt32()));
        Assert.Equal(["0000:05:00.0", "0000:05:01.0", "0000:06:00.0", "0000:07:00.0"], groups[13].GetProperty("devices").EnumerateArray().Select(d => d.GetString()));
        Assert.Equal(("NONE", "DEFAULT"), (groups[EduGroup].GetProperty("owner_kind").GetString(), groups[EduGroup].GetProperty("domain").GetString()));
        var devices = json.GetProperty("devices").EnumerateArray().ToDictionary(d => d.GetProperty("address").GetString()!);
        Assert.Equal(23, devices.Count);
        var edu = devices["0000:06:00.0"];
        Assert.Equal(("0000:05:00.0", "vfio-pci", "1234", "11e8", 13u), (edu.GetProperty("parent").GetString(), edu.GetProperty("driver").GetString(),
            edu.GetProperty("vendor_id").GetString(), edu.GetProperty("device_id").GetString(), edu.GetProperty("group_id").GetUInt32()));
        Assert.False(devices["0000:00:01.0"].TryGetProperty("parent", out _));
    }

    [Fact]
    public async Task Events_Claim_ArrivesAsGroupEventWithOwnerAndPrincipal()
    {
        await using var broker = await TestBroker.StartAsync();
        await using var events = await SseStream.OpenAsync(broker.WebAddress);
        var snapshot = await events.NextAsync();

        await using var session = await broker.Client.OpenSessionAsync("live-view-claim");
        await session.SetContainerAsync(EduGroup, await session.CreateContainerAsync(ContainerType.Type1V2));

        var change = await events.NextAsync();
        Assert.Equal(("group", snapshot.Revision + 1), (change.Name, change.Revision));
        var group = change.Json;
        Assert.Equal((EduGroup, "USER", 1, session.Id, "anonymous", "live-view-claim", 1ul, "USER"), (
            group.GetProperty("id").GetUInt32(), group.GetProperty("owner_kind").GetString(), group.GetProperty("owner_count").GetInt32(),
            group.GetProperty("owner_session").GetUInt64(), group.GetProperty("principal").GetString(), group.GetProperty("client_name").GetString(),
            group.GetProperty("generation").GetUInt64(), group.GetProperty("domain").GetString()));
    }

    [Fact]
    public async Task Events_LastEventIdStillKept_ResumesWithExactlyTheLaterChanges()
    {
        await using var broker = await TestBroker.StartAsync();
        await using var session = await broker.Client.OpenSessionAsync("churn");
        var seen = await ClaimReleaseClaimAsync(broker, session);

        await using var events = await SseStream.OpenAsync(broker.WebAddress, seen.ToString(System.Globalization.CultureInfo.InvariantCulture));

        var resumed = await events.NextAsync();
        Assert.Equal(("resumed", (string?)null, seen), (resumed.Name, resumed.Id, resumed.Json.GetProperty("after").GetUInt64()));
        var owners = new List<(ulong, string?)>();
        for (var i = 0; i < 3; i++)
        {
            var change = await events.NextAsync();
            Assert.Equal("group", change.Name);
            owners.Add((change.Revision, change.Json.GetProperty("owner_kind").GetString()));
        }
        Assert.Equal([(seen + 1, "USER"), (seen + 2, "NONE"), (seen + 3, "USER")], owners);
        // Nothing else was pending: the next event is the next change.
        await session.UnsetContainerAsync(EduGroup);
        var next = await events.NextAsync();
        Assert.Equal(("group", seen + 4), (next.Name, next.Revision));
    }

    [Fact]
    public async Task Events_LastEventIdNoLongerKept_StartsWithSnapshot()
    {
        await using var broker = await TestBroker.StartAsync(null, "--watch-buffer", "2");
        await using var session = await broker.Client.OpenSessionAsync("churn");
        var seen = await ClaimReleaseClaimAsync(broker, session);

        await using var events = await SseStream.OpenAsync(broker.WebAddress, seen.ToString(System.Globalization.CultureInfo.InvariantCulture));

        var snapshot = await events.NextAsync();
        Assert.Equal(("snapshot", seen + 3), (snapshot.Name, snapshot.Revision));
        var group = snapshot.Json.GetProperty("groups").EnumerateArray().Single(g => g.GetProperty("id").GetUInt32() == EduGroup);
        Assert.Equal("USER", group.GetProperty("owner_kind").GetString());
    }

    [Theory]
    [InlineData("")]
    [InlineData("junk")]
    [InlineData("-1")]
    [InlineData("1.5")]
    [InlineData("99999999999999999999999")]
    [InlineData("123456")]  // a revision this broker never reached (another run's)
    public async Task Events_LastEventIdNotAResumableRevision_StartsWithSnapshot(string lastEventId)
    {
        await using var broker = await TestBroker.StartAsync();
        await using var events = await SseStream.OpenAsync(broker.WebAddress, lastEventId);

        Assert.Equal(HttpStatusCode.OK, events.Status);
        var snapshot = await events.NextAsync();
        Assert.Equal(("snapshot", broker.Broker.Journal.Current.Revision), (snapshot.Name, snapshot.Revision));
    }

    [Fact]
    public async Task Events_ClientLeavesMidStream_WatchEndsWithoutErrors()
    {
        await using var broker = await TestBroker.StartAsync();
        var events = await SseStream.OpenAsync(broker.WebAddress);
        await events.NextAsync();
        Assert.Equal(1, broker.Broker.Journal.WatcherCount);

        await events.DisposeAsync();
        await broker.Ended.WaitForAsync("/events");

        Assert.Equal(0, broker.Broker.Journal.WatcherCount);
        Assert.Empty(broker.Log.Records);
    }

    [Fact]
    public async Task Events_BrokerStops_StreamEndsCleanly()
    {
        var broker = await TestBroker.StartAsync();
        try
        {
            await using var events = await SseStream.OpenAsync(broker.WebAddress);
            await events.NextAsync();

            var stopping = broker.StopAsync();
            // The end of the stream, well before the host's shutdown timeout would have cut it.
            while (await events.ReadLineAsync() is not null)
            {
            }
            await stopping.WaitAsync(TestBroker.Timeout);
            Assert.Equal(0, broker.Broker.Journal.WatcherCount);
        }
        finally
        {
            await broker.DisposeAsync();
        }
    }

    [Fact]
    public async Task Events_Idle_KeepaliveCommentOnTheBrokerClock()
    {
        var time = new FakeTimeProvider();
        await using var broker = await TestBroker.StartAsync(time);
        await using var events = await SseStream.OpenAsync(broker.WebAddress);
        await events.NextAsync();

        time.Advance(LiveViewEndpoints.HeartbeatInterval);

        Assert.Equal(": keepalive", await events.ReadLineAsync());
        Assert.Equal("", await events.ReadLineAsync());
    }

    [Fact]
    public async Task Page_ServedWithItsScriptAndStyle_Locked()
    {
        await using var broker = await TestBroker.StartAsync();
        using var http = new HttpClient();

        using var page = await http.GetAsync($"{broker.WebAddress}/").WaitAsync(TestBroker.Timeout);
        Assert.Equal(HttpStatusCode.OK, page.StatusCode);
        Assert.Equal("text/html; charset=utf-8", page.Content.Headers.ContentType?.ToString());
        Assert.Contains("script-src 'self'", page.Headers.GetValues("Content-Security-Policy").Single(), StringComparison.Ordinal);
        var html = await page.Content.ReadAsStringAsync();
        Assert.Contains("<script src=\"live.js\"", html, StringComparison.Ordinal);
        Assert.Contains("<link rel=\"stylesheet\" href=\"live.css\">", html, StringComparison.Ordinal);
        foreach (var (path, type, marker) in new[] { ("/live.js", "text/javascript; charset=utf-8", "new EventSource('events')"), ("/live.css", "text/css; charset=utf-8", ".group") })
        {
            using var asset = await http.GetAsync($"{broker.WebAddress}{path}").WaitAsync(TestBroker.Timeout);
            Assert.Equal((HttpStatusCode.OK, type), (asset.StatusCode, asset.Content.Headers.ContentType?.ToString()));
            Assert.Contains(marker, await asset.Content.ReadAsStringAsync(), StringComparison.Ordinal);
        }
    }

    // Three changes to the edu group, one revision each; returns the revision before them.
    private static async Task<ulong> ClaimReleaseClaimAsync(TestBroker broker, Client.BrokerSession session)
    {
        var container = await session.CreateContainerAsync(ContainerType.Type1V2);
        var before = broker.Broker.Journal.Current.Revision;
        await session.SetContainerAsync(EduGroup, container);
        await session.UnsetContainerAsync(EduGroup);
        await session.SetContainerAsync(EduGroup, container);
        Assert.Equal(before + 3, broker.Broker.Journal.Current.Revision);
        return before;
    }

    // --- auth: a token as Bearer for scripts, as the Basic password for browsers ---

    private const string ViewerToken = "view-token-1";
    private const string UserToken = "user-token-1";

    private static string AuthFile(string directory)
    {
        var path = Path.Combine(directory, "auth.json");
        File.WriteAllText(path, $$"""
            { "principals": [
                { "name": "token:ops", "token_sha256": "{{SecureBroker.Sha256(ViewerToken)}}", "roles": ["viewer"] },
                { "name": "token:ci", "token_sha256": "{{SecureBroker.Sha256(UserToken)}}", "roles": ["user"] } ] }
            """);
        return path;
    }

    private static AuthenticationHeaderValue Basic(string user, string password) =>
        new("Basic", Convert.ToBase64String(Encoding.UTF8.GetBytes($"{user}:{password}")));

    public static TheoryData<string, AuthenticationHeaderValue?> Refused => new()
    {
        { "none", null },
        { "wrong bearer", new AuthenticationHeaderValue("Bearer", ViewerToken + "x") },
        { "wrong basic password", Basic("viewer", ViewerToken + "x") },
        { "basic without colon", new AuthenticationHeaderValue("Basic", Convert.ToBase64String(Encoding.UTF8.GetBytes(ViewerToken))) },
        { "basic not base64", new AuthenticationHeaderValue("Basic", "!!" + ViewerToken) },
    };

    [Theory]
    [MemberData(nameof(Refused))]
    public async Task Events_UnderAuthFileWithoutValidToken_401WithBasicChallenge_TokenNeverEchoedNorLogged(string what, AuthenticationHeaderValue? authorization)
    {
        var directory = Directory.CreateTempSubdirectory("dmabroker-live-").FullName;
        try
        {
            await using var broker = await TestBroker.StartAsync(null, "--auth-file", AuthFile(directory), "--Logging:LogLevel:Default=Debug");
            await using var events = await SseStream.OpenAsync(broker.WebAddress, authorization: authorization);

            Assert.True(events.Status == HttpStatusCode.Unauthorized, $"{what}: {events.Status}");
            Assert.Contains(events.Headers.WwwAuthenticate, c => c.Scheme == "Basic");
            Assert.DoesNotContain(ViewerToken, await events.ReadRefusalAsync(), StringComparison.Ordinal);
            Assert.Equal(0, broker.Broker.Journal.WatcherCount);
            Assert.DoesNotContain(broker.Log.Records, r => r.ToString().Contains(ViewerToken, StringComparison.Ordinal));
        }
        finally
        {
            Directory.Delete(directory, recursive: true);
        }
    }

    [Theory]
    [InlineData("bearer")]
    [InlineData("basic")]
    [InlineData("basic, user token")]
    public async Task Events_UnderAuthFileWithToken_Streams(string how)
    {
        var directory = Directory.CreateTempSubdirectory("dmabroker-live-").FullName;
        try
        {
            await using var broker = await TestBroker.StartAsync(null, "--auth-file", AuthFile(directory));
            var authorization = how switch
            {
                "bearer" => new AuthenticationHeaderValue("Bearer", ViewerToken),
                "basic" => Basic("", ViewerToken),
                _ => Basic("anyone", UserToken),
            };
            await using var events = await SseStream.OpenAsync(broker.WebAddress, authorization: authorization);

            Assert.Equal(HttpStatusCode.OK, events.Status);
            Assert.Equal("snapshot", (await events.NextAsync()).Name);
        }
        finally
        {
            Directory.Delete(directory, recursive: true);
        }
    }
}
