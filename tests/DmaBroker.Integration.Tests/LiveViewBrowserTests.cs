using System.ComponentModel;
using System.Reflection;
using System.Security.Cryptography;
using System.Text;
using DmaBroker.Client;
using DmaBroker.Protocol.V1;
using Xunit.Abstractions;

namespace DmaBroker.Integration.Tests;

/// <summary>
/// The live view (SPEC §13) in a real headless browser: Debian's Chromium, driven by
/// <c>web/liveview.mjs</c> through playwright-core, against a broker process. The page must draw
/// the default topology, and a group claimed through the VFIO flow while it is open must show
/// USER within a second. CI installs what it needs (.ci/run: chromium, <c>npm ci</c>); a machine
/// without it fails here with what to run.
/// </summary>
public sealed class LiveViewBrowserTests(ITestOutputHelper output) : IDisposable
{
    private const uint Group = 14;
    private const string ViewerToken = "live-view-viewer-token";
    private const string UserToken = "live-view-user-token";
    private static readonly TimeSpan Timeout = TimeSpan.FromSeconds(60);
    private static readonly byte[] PngSignature = [0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a];

    private static readonly string ScriptDirectory = typeof(LiveViewBrowserTests).Assembly.GetCustomAttributes<AssemblyMetadataAttribute>()
        .Single(a => a.Key == "LiveViewScriptDirectory").Value!;

    private readonly string _directory = Directory.CreateTempSubdirectory("dmabroker-liveview-").FullName;

    public void Dispose() => Directory.Delete(_directory, recursive: true);

    [Theory]
    [InlineData(false)]
    [InlineData(true)]  // under an auth file: the browser gives a viewer token as the Basic password
    public async Task Page_GroupClaimedWhileOpen_ItsBoxShowsUserWithinOneSecond(bool withToken)
    {
        RequireBrowserTooling();
        // Under the auth file, the test's client is a user by its token, the browser a viewer by its own.
        await using var broker = withToken
            ? await LiveBroker.StartAsync(new BrokerClientOptions { BearerToken = UserToken }, "--auth-file", WriteAuthFile())
            : await LiveBroker.StartAsync();
        var screenshot = Path.Combine(_directory, "liveview.png");
        var profile = Directory.CreateDirectory(Path.Combine(_directory, "profile")).FullName;
        string[] scriptArgs = [Path.Combine(ScriptDirectory, "liveview.mjs"), $"{broker.WebAddress}/", screenshot, profile, .. withToken ? new[] { ViewerToken } : []];
        await using var browser = StartNode(scriptArgs);

        var ready = await browser.WaitForLineAsync("ready ", Timeout);
        Assert.EndsWith("ready groups=18 devices=23 group14=NONE", ready, StringComparison.Ordinal);

        await using var session = await broker.Client.OpenSessionAsync("live-view-test");
        var container = await session.CreateContainerAsync(ContainerType.Type1V2);
        var claimedAt = DateTimeOffset.UtcNow.ToUnixTimeMilliseconds();
        await session.SetContainerAsync(Group, container);
        await browser.WriteLineAsync($"claimed {Group} {claimedAt}");

        // The script waits at most 1000 ms for the box to change after this line, or fails.
        var changed = await browser.WaitForLineAsync("changed ", Timeout);
        output.WriteLine(changed);
        Assert.Contains($"changed group={Group} owner=USER", changed, StringComparison.Ordinal);
        Assert.Equal(0, await browser.WaitForExitAsync(Timeout));
        var png = await File.ReadAllBytesAsync(screenshot);
        Assert.True(png.AsSpan().StartsWith(PngSignature), $"{screenshot} is not a PNG; the script printed:\n{browser.Transcript}");
        output.WriteLine($"screenshot: {png.Length} bytes");
    }

    private string WriteAuthFile()
    {
        static string Sha256(string token) => Convert.ToHexStringLower(SHA256.HashData(Encoding.UTF8.GetBytes(token)));
        var path = Path.Combine(_directory, "auth.json");
        File.WriteAllText(path, $$"""
            { "principals": [
                { "name": "token:ops", "token_sha256": "{{Sha256(ViewerToken)}}", "roles": ["viewer"] },
                { "name": "token:ci", "token_sha256": "{{Sha256(UserToken)}}", "roles": ["user"] } ] }
            """);
        return path;
    }

    private static ClientProcess StartNode(string[] args)
    {
        try
        {
            return ClientProcess.StartProgram("node", "liveview.mjs", withInput: true, args);
        }
        catch (Win32Exception e)
        {
            throw new Xunit.Sdk.XunitException($"cannot run node ({e.Message}): this test needs Node.js 20 or later on PATH");
        }
    }

    private static void RequireBrowserTooling()
    {
        if (!Directory.Exists(Path.Combine(ScriptDirectory, "node_modules", "playwright-core")))
            throw new Xunit.Sdk.XunitException($"playwright-core is not installed for the live view test: run `npm ci --prefix {ScriptDirectory}` (.ci/run does)");
        var chromium = Environment.GetEnvironmentVariable("CHROMIUM_PATH") is { Length: > 0 } path ? path : "/usr/bin/chromium";
        if (!File.Exists(chromium))
            throw new Xunit.Sdk.XunitException($"no Chromium at {chromium}: install Debian's (`apt-get install -y chromium`, as .ci/run does) or set CHROMIUM_PATH");
    }
}
